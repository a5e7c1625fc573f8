//! The operator commands that read the running agent's admin API: `switchyard conns`,
//! `services`, `top`, `resolve`, `stat`, `edges` and `tap`, as aligned tables, trees or
//! lines (or `--json` for scripts).

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    admin::{self, encode},
    stats::conns::age,
};

/// GET a JSON document from the admin API, turning error answers into errors.
async fn get_json(admin_addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    Ok(get_json_page(admin_addr, path).await?.0)
}

async fn get_json_page(admin_addr: SocketAddr, path: &str) -> anyhow::Result<(Value, Option<String>)> {
    let (status, body, next) = admin::get_page(admin_addr, path).await?;
    let value: Value = serde_json::from_str(&body)
        .with_context(|| format!("the admin API answered {status} with non-JSON: {body}"))?;
    if status != 200 {
        bail!("{}", value["error"].as_str().unwrap_or(&body));
    }
    Ok((value, next))
}

/// Every page of a paged list (`/services`, `/conns`; see `admin::PAGE`), one after the
/// other. `query` is the list's filters, `key=value&...` or empty.
async fn get_all(admin_addr: SocketAddr, path: &str, query: &str) -> anyhow::Result<Value> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after.as_ref().map(|a| format!("after={a}&")).unwrap_or_default();
        let (page, next) = get_json_page(admin_addr, &format!("{path}?{cursor}{query}")).await?;
        all.extend(page.as_array().cloned().unwrap_or_default());
        match next {
            // The cursor comes percent-encoded.
            Some(n) if Some(&n) != after.as_ref() => after = Some(n),
            _ => return Ok(Value::Array(all)),
        }
    }
}

/// `switchyard resolve`: how `target` (a service name or address) resolves, down to
/// endpoint health.
pub async fn resolve(admin_addr: SocketAddr, target: &str, json: bool) -> anyhow::Result<String> {
    let value = get_json(admin_addr, &format!("/resolve?target={}", encode(target))).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&value)?);
    }
    let tree: crate::resolve::Node = serde_json::from_value(value).context("read the resolution tree")?;
    Ok(crate::resolve::render(&tree).trim_end().to_owned())
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut i) = (bytes as f64, 0);
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", units[i]) }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn conn_row(c: &Value) -> Vec<String> {
    let client = &c["client"];
    let who = if client.is_null() { s(&c["peer"]) } else { format!("{}/{}", s(&client["comm"]), s(&client["pid"])) };
    // The pod when there is one (its workload is in `stat`), else the workload.
    let workload = if client["pod_name"].is_string() { s(&client["pod_name"]) } else { s(&client["workload"]) };
    // Which network namespace: the agent's own (host network) or a pod's, by cookie.
    let netns = match client["pod"].as_bool() {
        Some(true) => format!("pod:{}", s(&client["netns"])),
        Some(false) => "host".into(),
        None => "-".into(),
    };
    vec![
        s(&c["id"]),
        who,
        workload,
        netns,
        s(&client["original_dst"]),
        s(&c["service"]),
        s(&c["protocol"]),
        // HTTP connections have no endpoint of their own: each request picks one.
        if c["route"].is_null() && c["requests"].as_u64().is_some_and(|n| n > 0) {
            format!("per request ({})", c["requests"])
        } else {
            s(&c["route"]["endpoint"])
        },
        // Connections the kernel sent straight to an endpoint are marked as such.
        if c["via"] == "kernel" { format!("{} (kernel)", s(&c["state"])) } else { s(&c["state"]) },
        age(c["age_ms"].as_u64().unwrap_or(0)),
        human(c["bytes_out"].as_u64().unwrap_or(0)),
        human(c["bytes_in"].as_u64().unwrap_or(0)),
    ]
}

const CONN_HEADER: [&str; 12] =
    ["ID", "CLIENT", "WORKLOAD/POD", "NETNS", "DIALLED", "SERVICE", "PROTO", "ENDPOINT", "STATE", "AGE", "OUT", "IN"];

/// `switchyard conns`.
pub async fn conns(admin_addr: SocketAddr, filters: &[(&str, Option<String>)], json: bool) -> anyhow::Result<String> {
    let query: Vec<String> =
        filters.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v)))).collect();
    let conns = get_all(admin_addr, "/conns", &query.join("&")).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&conns)?);
    }
    let rows: Vec<Vec<String>> = conns.as_array().into_iter().flatten().map(conn_row).collect();
    Ok(table(&CONN_HEADER, &rows))
}

/// `switchyard services [PREFIX]`.
pub async fn services(admin_addr: SocketAddr, prefix: Option<&str>, json: bool) -> anyhow::Result<String> {
    let query = prefix.map(|p| format!("prefix={}", encode(p))).unwrap_or_default();
    let services = get_all(admin_addr, "/services", &query).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&services)?);
    }
    let rows: Vec<Vec<String>> = services
        .as_array()
        .into_iter()
        .flatten()
        .map(|svc| {
            let eps = svc["endpoints"].as_array().cloned().unwrap_or_default();
            let healthy = eps.iter().filter(|e| e["health"] == "healthy").count();
            let open: u64 = eps.iter().filter_map(|e| e["open_connections"].as_u64()).sum();
            let ok: u64 = eps.iter().filter_map(|e| e["connects_ok"].as_u64()).sum();
            let kind = if svc["kind"] == "endpoints" {
                s(&svc["balance"])
            } else {
                format!(
                    "{} -> {}",
                    s(&svc["kind"]),
                    svc["route"].as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(",")
                )
            };
            vec![
                s(&svc["service"]),
                svc["addresses"].as_array().into_iter().flatten().map(s).collect::<Vec<_>>().join(","),
                kind,
                if svc["kind"] == "endpoints" { format!("{healthy}/{}", eps.len()) } else { "-".into() },
                if svc["healthy"] == true { "yes".into() } else { "NO".into() },
                open.to_string(),
                ok.to_string(),
            ]
        })
        .collect();
    Ok(table(&["SERVICE", "ADDRESSES", "BALANCE/ROUTE", "HEALTHY EPS", "SERVING", "OPEN", "CONNECTS"], &rows))
}

/// `switchyard top`: connections sorted by traffic over the last interval, refreshed.
/// `iterations` bounds it (0: until interrupted).
pub async fn top(admin_addr: SocketAddr, interval: Duration, iterations: u64) -> anyhow::Result<()> {
    let mut before: HashMap<u64, u64> = HashMap::new();
    let mut n = 0;
    loop {
        let conns = get_json(admin_addr, "/conns").await?;
        let mut rows: Vec<(u64, Vec<String>)> = conns
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let id = c["id"].as_u64().unwrap_or(0);
                let total = c["bytes_out"].as_u64().unwrap_or(0) + c["bytes_in"].as_u64().unwrap_or(0);
                let rate = total.saturating_sub(before.get(&id).copied().unwrap_or(total));
                before.insert(id, total);
                let mut row = conn_row(c);
                row.push(format!("{}/s", human((rate as f64 / interval.as_secs_f64()) as u64)));
                (rate, row)
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.0));
        let mut header = CONN_HEADER.to_vec();
        header.push("RATE");
        let body = table(&header, &rows.into_iter().map(|(_, r)| r).collect::<Vec<_>>());
        // Clear the screen and home the cursor, like top(1).
        print!(
            "\x1b[2J\x1b[H{} connections, refreshed every {:?} (ctrl-c to quit)\n\n{body}\n",
            before.len(),
            interval
        );
        n += 1;
        if iterations != 0 && n >= iterations {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

fn rate(v: &Value) -> String {
    format!("{:.1}/s", v.as_f64().unwrap_or(0.0))
}

fn percent(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |r| format!("{:.2}%", r * 100.0))
}

fn millis(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |ms| format!("{ms:.1}ms"))
}

/// The golden-signal columns of a `/stat` or `/edges` row.
fn signal_cells(r: &Value) -> Vec<String> {
    vec![
        s(&r["requests"]),
        percent(&r["success_rate"]),
        rate(&r["request_rate"]),
        millis(&r["latency_p50_ms"]),
        millis(&r["latency_p95_ms"]),
        millis(&r["latency_p99_ms"]),
        rate(&r["connection_rate"]),
        s(&r["open"]),
        s(&r["connect_failures"]),
        human(r["bytes_out"].as_u64().unwrap_or(0)),
        human(r["bytes_in"].as_u64().unwrap_or(0)),
    ]
}

const SIGNAL_HEADER: [&str; 11] =
    ["REQUESTS", "SUCCESS", "RPS", "P50", "P95", "P99", "CONN/S", "OPEN", "CONN FAIL", "OUT", "IN"];

/// `switchyard stat [services|workloads|routes|endpoints]`: golden signals, like `linkerd
/// viz stat`. Totals since the agent started; rates, success and latency over `window`.
pub async fn stat(
    admin_addr: SocketAddr,
    by: &str,
    filters: &[(&str, Option<String>)],
    window: u64,
    json: bool,
) -> anyhow::Result<String> {
    let mut query = vec![format!("by={}", encode(by)), format!("window={window}")];
    query.extend(filters.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v)))));
    let rows = get_json(admin_addr, &format!("/stat?{}", query.join("&"))).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&rows)?);
    }
    let keys: Vec<&str> = match crate::stats::stat::By::parse(by) {
        Some(crate::stats::stat::By::Workload) => vec!["workload"],
        Some(crate::stats::stat::By::Route) => vec!["workload", "service"],
        Some(crate::stats::stat::By::Endpoint) => vec!["service", "endpoint"],
        _ => vec!["service"],
    };
    let mut header: Vec<&str> = keys
        .iter()
        .map(|k| match *k {
            "workload" => "WORKLOAD",
            "service" => "SERVICE",
            _ => "ENDPOINT",
        })
        .collect();
    header.extend(SIGNAL_HEADER);
    let table_rows: Vec<Vec<String>> = rows
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| keys.iter().map(|k| s(&r[*k])).chain(signal_cells(r)).collect())
        .collect();
    Ok(format!(
        "{}\n(rates over the last {window}s; REQUESTS, CONN FAIL and bytes since the agent started)",
        table(&header, &table_rows)
    ))
}

/// `switchyard edges`: who talks to whom right now.
pub async fn edges(admin_addr: SocketAddr, window: u64, json: bool) -> anyhow::Result<String> {
    let graph = get_json(admin_addr, &format!("/edges?window={window}")).await?;
    if json {
        return Ok(serde_json::to_string_pretty(&graph)?);
    }
    let row = |from: &Value, to: &Value, r: &Value| {
        vec![
            s(from),
            "->".into(),
            s(to),
            rate(&r["request_rate"]),
            percent(&r["success_rate"]),
            rate(&r["connection_rate"]),
            s(&r["open"]),
        ]
    };
    let mut rows: Vec<Vec<String>> = Vec::new();
    for r in graph["routes"].as_array().into_iter().flatten() {
        rows.push(row(&r["workload"], &r["service"], r));
    }
    for r in graph["endpoints"].as_array().into_iter().flatten() {
        rows.push(row(&r["service"], &r["endpoint"], r));
    }
    Ok(table(&["FROM", "", "TO", "RPS", "SUCCESS", "CONN/S", "OPEN"], &rows))
}

/// One tap event as a line: what happened, who, where, how it went.
fn tap_line(e: &Value) -> String {
    let client = &e["client"];
    let who = if client["pod"].is_string() { s(&client["pod"]) } else { s(&client["workload"]) };
    let who = format!("{who} {}/{}", s(&client["comm"]), s(&client["pid"]));
    match e["kind"].as_str() {
        Some("request") => {
            let r = &e["request"];
            let grpc = r["grpc_status"].as_u64().map(|g| format!(" grpc-status={g}")).unwrap_or_default();
            format!(
                "req {} {}{} -> {} :status={}{grpc} {} latency={} endpoint={} client={who}",
                s(&r["method"]),
                s(&r["authority"]),
                s(&r["path"]),
                s(&e["service"]),
                s(&r["status"]),
                if r["success"] == true { "ok" } else { "FAIL" },
                millis(&e["latency_ms"]),
                s(&e["endpoint"]),
            )
        }
        Some("connect") => format!(
            "tcp connect -> {} endpoint={} connect={} client={who}",
            s(&e["service"]),
            s(&e["endpoint"]),
            millis(&e["latency_ms"])
        ),
        Some("close") => format!(
            "tcp close -> {} endpoint={} {} after={} out={} in={} client={who}",
            s(&e["service"]),
            s(&e["endpoint"]),
            s(&e["outcome"]),
            millis(&e["latency_ms"]),
            human(e["bytes_out"].as_u64().unwrap_or(0)),
            human(e["bytes_in"].as_u64().unwrap_or(0)),
        ),
        Some("dropped") => {
            format!("({} events lost: this tap fell behind)", s(&e["count"]))
        }
        _ => e.to_string(),
    }
}

/// `switchyard tap`: requests and connections as they happen, until `limit` events or
/// `seconds` pass (or ctrl-c).
pub async fn tap(
    admin_addr: SocketAddr,
    filters: &[(&str, Option<String>)],
    limit: Option<u64>,
    seconds: u64,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut query = vec![format!("seconds={seconds}")];
    query.extend(limit.map(|l| format!("limit={l}")));
    query.extend(filters.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v)))));
    let mut out = std::io::stdout();
    let status = admin::get_lines(admin_addr, &format!("/tap?{}", query.join("&")), |line| {
        let Ok(e) = serde_json::from_str::<Value>(line) else { return true };
        let text = if json {
            line.to_owned()
        } else if e["kind"] == "started" {
            "tapping (ctrl-c to stop)".into()
        } else {
            tap_line(&e)
        };
        writeln!(out, "{text}").is_ok() && out.flush().is_ok()
    })
    .await?;
    if status != 200 {
        bail!("the admin API answered {status} to /tap");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "LONGER"], &[vec!["wide cell".into(), "x".into()], vec!["y".into(), "z".into()]]);
        assert_eq!(t, "A          LONGER\nwide cell  x\ny          z");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
