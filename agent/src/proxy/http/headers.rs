//! What the proxy reads from and does to headers: hop-by-hop fields (RFC 9110 §7.6.1)
//! are dropped, everything else passes unchanged; upgrades are recognised; the
//! `l5d-dtab` override is parsed; responses are classified for retries.

use hyper::{
    Method, Request, StatusCode,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};

use crate::config::RetryConfig;

/// The request header naming a per-request route override, linkerd 1's name for it:
/// `l5d-dtab: /svc/web => /svc/web-canary`. It is forwarded unchanged, so a chain of
/// agents honours it at every hop.
pub const DTAB: &str = "l5d-dtab";

/// Drop the connection-specific fields: those `Connection` lists and the fixed set. An
/// upgrade request keeps `Connection: upgrade` and `Upgrade`, which the upstream needs.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a lookup per field
    // (every request and response comes through here). Fields `Connection` lists need
    // a `Connection` field, which is in the set.
    if !headers.keys().any(is_fixed_hop_by_hop) {
        return;
    }
    // TE: only `trailers` means anything end to end (gRPC sends it). Read before the
    // listed fields go, since RFC 9110 §10.1.4 has a sender of TE list it in
    // `Connection`, and from every TE line, not only the first.
    let trailers = has_token(headers, header::TE, "trailers");
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The connection-specific fields every message may carry, whatever `Connection` lists.
fn is_fixed_hop_by_hop(name: &HeaderName) -> bool {
    [header::CONNECTION, header::TE, header::TRANSFER_ENCODING, header::UPGRADE].contains(name)
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// An HTTP/1.1 upgrade (WebSocket) or a CONNECT tunnel: after the response the
/// connection carries opaque bytes.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        || (req.headers().contains_key(header::UPGRADE) && has_token(req.headers(), header::CONNECTION, "upgrade"))
}

/// Whether any `field` line lists `token` (a comma-separated list, case aside).
pub fn has_token(headers: &HeaderMap, field: HeaderName, token: &str) -> bool {
    headers
        .get_all(field)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 9110 §9.2.2: sending these twice has the effect of sending them once.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// Where `l5d-dtab` sends requests for `service`: the last matching `/svc/<service> =>
/// /svc/<target>` entry (dentries are `;`-separated; later ones win, as in linkerd 1).
/// A target is one name: an entry whose right side is empty or more than one word (a
/// missing `;`) names nothing (found by fuzz/fuzz_targets/headers.rs).
pub fn dtab_target<'h>(headers: &'h HeaderMap, service: &str) -> Option<&'h str> {
    let prefix = format!("/svc/{service}");
    headers
        .get_all(DTAB)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|dentry| {
            let (from, to) = dentry.split_once("=>")?;
            let target = to.trim().strip_prefix("/svc/")?;
            let one_name = !target.is_empty() && !target.contains(char::is_whitespace);
            (from.trim() == prefix && one_name).then_some(target)
        })
        .next_back()
}

/// Whether a response says the request was not acted on and may go elsewhere: a
/// configured status, or a trailers-only gRPC response with a configured grpc-status.
pub fn retryable(status: StatusCode, headers: &HeaderMap, policy: &RetryConfig) -> bool {
    policy.on_status.contains(&status.as_u16())
        || headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
            .is_some_and(|code| policy.on_grpc.contains(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap())).collect()
    }

    #[test]
    fn hop_by_hop_fields_go_and_the_rest_stay() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers, deflate"),
            ("host", "web"),
            ("x-request-id", "abc"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["host", "te", "x-request-id"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn te_trailers_is_kept_from_any_line_and_when_connection_lists_it() {
        // Found by fuzz/fuzz_targets/headers.rs: only the first TE line was read, and a
        // TE that Connection lists (as RFC 9110 asks) was dropped with the listed fields.
        for pairs in [
            &[("te", "gzip"), ("te", "trailers")][..],
            &[("connection", "te"), ("te", "trailers")],
            &[("connection", "TE, keep-alive"), ("te", "deflate, trailers")],
        ] {
            let mut h = headers(pairs);
            strip_hop_by_hop(&mut h, false);
            assert_eq!(h.get_all("te").iter().collect::<Vec<_>>(), ["trailers"], "{pairs:?}");
        }
        let mut h = headers(&[("te", "gzip"), ("te", "deflate")]);
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn an_upgrade_keeps_what_the_upstream_needs() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        let req = {
            let mut r = Request::new(());
            *r.headers_mut() = h.clone();
            r
        };
        assert!(is_upgrade(&req));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "Upgrade");
        assert!(!is_upgrade(&Request::new(())));
    }

    #[test]
    fn dtab_picks_the_last_matching_dentry_for_this_service() {
        let h = headers(&[("l5d-dtab", "/svc/web => /svc/web-v2; /svc/db => /svc/db-b ;/svc/web=>/svc/web-v3")]);
        assert_eq!(dtab_target(&h, "web"), Some("web-v3"));
        assert_eq!(dtab_target(&h, "db"), Some("db-b"));
        assert_eq!(dtab_target(&h, "cache"), None);
        assert_eq!(dtab_target(&headers(&[("l5d-dtab", "garbage")]), "web"), None);
    }

    #[test]
    fn retryable_statuses_and_grpc_codes() {
        let policy = RetryConfig::default();
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), &policy));
        assert!(!retryable(StatusCode::INTERNAL_SERVER_ERROR, &HeaderMap::new(), &policy));
        assert!(retryable(StatusCode::OK, &headers(&[("grpc-status", "14")]), &policy));
        assert!(!retryable(StatusCode::OK, &headers(&[("grpc-status", "0")]), &policy));
    }

    #[test]
    fn a_dtab_target_is_one_name() {
        let h = headers(&[(DTAB, "/svc/web => /svc/canary; /svc/web=>/svc/ /svc/web => /svc/x")]);
        assert_eq!(dtab_target(&h, "web"), Some("canary"), "a run-on entry names nothing; the last good one wins");
        let h = headers(&[(DTAB, "/svc/web => /svc/")]);
        assert_eq!(dtab_target(&h, "web"), None);
    }
}
