//! The agent's own header handling on any HTTP/1 request head (split into fields as
//! hyper's parser does): hop-by-hop stripping, upgrade recognition, the `l5d-dtab`
//! override and retry classification never panic, and stripping keeps its promises:
//! no connection-specific field survives (an upgrade keeps `Connection` and `Upgrade`),
//! `TE` is at most `trailers`, every end-to-end field passes unchanged, and stripping
//! twice is stripping once (a chain of agents forwards what the first one did).
#![no_main]

use hyper::{
    Method, Request, StatusCode,
    header::{self, HeaderMap, HeaderName, HeaderValue},
};
use libfuzzer_sys::fuzz_target;
use switchyard::{
    config::RetryConfig,
    fuzzing::{DTAB, dtab_target, is_upgrade, retryable, strip_hop_by_hop},
};

/// Dropped whatever `Connection` says (RFC 9110 §7.6.1 and the de-facto ones).
const ALWAYS_HOP: [&str; 3] = ["keep-alive", "proxy-connection", "transfer-encoding"];

fuzz_target!(|head: &[u8]| {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut fields);
    if parsed.parse(head).is_err() {
        return;
    }
    let method = parsed.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()).unwrap_or(Method::GET);
    let mut headers = HeaderMap::new();
    for f in parsed.headers.iter().take_while(|f| !f.name.is_empty()) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(f.name.as_bytes()), HeaderValue::from_bytes(f.value)) {
            headers.append(name, value);
        }
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.headers_mut() = headers.clone();
    let upgrade = is_upgrade(&req);

    let mut stripped = headers.clone();
    strip_hop_by_hop(&mut stripped, upgrade);
    check_stripped(&headers, &stripped, upgrade);
    let mut twice = stripped.clone();
    strip_hop_by_hop(&mut twice, upgrade);
    assert_eq!(twice, stripped, "stripping again changed the fields");

    // The override names a target only from a `/svc/<service> => /svc/<target>` entry.
    let service = parsed.path.and_then(|p| p.strip_prefix('/')).unwrap_or("web");
    if let Some(target) = dtab_target(&stripped, service) {
        assert_eq!(target, target.trim(), "a dtab target with blanks around it");
        assert!(stripped.get_all(DTAB).iter().any(|v| v.as_bytes().windows(2).any(|w| w == b"=>")));
    }
    let policy = RetryConfig::default();
    for status in [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE] {
        let by_status = retryable(status, &HeaderMap::new(), &policy);
        if retryable(status, &stripped, &policy) && !by_status {
            assert!(stripped.contains_key("grpc-status"), "retryable by a grpc-status that is not there");
        }
    }
});

fn check_stripped(before: &HeaderMap, after: &HeaderMap, upgrade: bool) {
    for name in ALWAYS_HOP {
        assert!(!after.contains_key(name), "`{name}` survived");
    }
    if !upgrade {
        assert!(!after.contains_key(header::CONNECTION) && !after.contains_key(header::UPGRADE));
    }
    if let Some(te) = after.get(header::TE) {
        assert_eq!((te, after.get_all(header::TE).iter().count()), (&HeaderValue::from_static("trailers"), 1));
    }
    // Whatever field line says it, and whether or not Connection lists TE (RFC 9110
    // §10.1.4 asks a sender of TE to), a client's `trailers` reaches the upstream.
    let trailers = before
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    assert_eq!(after.contains_key(header::TE), trailers, "TE: trailers kept if and only if the client sent it");
    let listed: Vec<String> = before
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    for name in &listed {
        // TE goes its own way (above); an upgrade keeps its Upgrade.
        if !(name == "te" || upgrade && name == "upgrade") && HeaderName::from_bytes(name.as_bytes()).is_ok() {
            assert!(!after.contains_key(name.as_str()), "`{name}` is listed in Connection yet survived");
        }
    }
    let hop = |name: &HeaderName| {
        ALWAYS_HOP.contains(&name.as_str())
            || [header::CONNECTION, header::UPGRADE, header::TE].contains(name)
            || listed.iter().any(|l| l == name.as_str())
    };
    for name in before.keys().filter(|n| !hop(n)) {
        assert!(before.get_all(name).iter().eq(after.get_all(name).iter()), "end-to-end field `{name}` changed");
    }
    for name in after.keys() {
        assert!(before.contains_key(name), "`{name}` appeared");
    }
}
