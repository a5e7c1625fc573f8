//! The operator commands that read the running agent's admin API: `switchyard conns`,
//! `services`, `top` and `resolve`, as aligned tables or trees (or `--json` for scripts).

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
    // Which network namespace: the agent's own (host network) or a pod's, by cookie.
    let netns = match client["pod"].as_bool() {
        Some(true) => format!("pod:{}", s(&client["netns"])),
        Some(false) => "host".into(),
        None => "-".into(),
    };
    vec![
        s(&c["id"]),
        who,
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

const CONN_HEADER: [&str; 11] =
    ["ID", "CLIENT", "NETNS", "DIALLED", "SERVICE", "PROTO", "ENDPOINT", "STATE", "AGE", "OUT", "IN"];

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
