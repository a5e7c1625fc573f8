//! The admin API's query strings, on any request target (as hyper hands it over) and
//! any values:
//!
//! * parsing never panics, and `limit` is always within 1..=PAGE;
//! * what `admin::encode` makes (the CLI's filters, the server's `x-next-after` cursor)
//!   is a valid request target and decodes to the value it was made from;
//! * paging `/services` with any `prefix` and first `after`, following the cursor as the
//!   CLI does, lists exactly the services named after `after` that start with `prefix`,
//!   in order, each once.
#![no_main]

use std::{sync::OnceLock, time::Instant};

use hyper::Uri;
use libfuzzer_sys::fuzz_target;
use switchyard::{
    admin::{PAGE, encode, limit, parse_query},
    config::{Config, ServiceConfig},
    resolve,
    state::{Resolved, Snapshot},
};

/// Names that need encoding, share prefixes, or sort around each other.
const NAMES: &[&str] = &[
    "web",
    "web-v2",
    "web/v2",
    "shop/cart",
    "shop/checkout",
    "shop/\u{e9}t\u{e9}",
    "a&b=c",
    "100%",
    "x y",
    "+plus",
    "z",
    "\u{1f680}",
];

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let config = Config { services: NAMES.iter().map(|n| ServiceConfig::named(n)).collect(), ..Default::default() };
        Snapshot::build(&config, &Resolved::new(), None)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(uri) = Uri::try_from(data) {
        let q = parse_query(uri.query().unwrap_or(""));
        let n = limit(&q);
        assert!((1..=PAGE).contains(&n), "limit {n}");
    }
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (prefix, after, page) = (parts.next().unwrap_or(""), parts.next(), parts.next().map_or(1, str::len));

    let query = format!("prefix={}&after={}", encode(prefix), encode(after.unwrap_or("")));
    let uri: Uri = format!("/services?{query}").parse().expect("an encoded query is a valid request target");
    let q = parse_query(uri.query().unwrap_or(""));
    assert_eq!(q.get("prefix").map(String::as_str), Some(prefix));
    assert_eq!(q.get("after").map(String::as_str), Some(after.unwrap_or("")));

    paging(prefix, after, page.clamp(1, NAMES.len() + 1));
});

/// Every page in turn, the cursor going through the header and query as on the wire.
fn paging(prefix: &str, first_after: Option<&str>, page: usize) {
    let snapshot = snapshot();
    let mut want: Vec<&str> =
        NAMES.iter().copied().filter(|n| n.starts_with(prefix) && first_after.is_none_or(|a| *n > a)).collect();
    want.sort_unstable();
    let mut got: Vec<String> = Vec::new();
    let mut after = first_after.map(str::to_owned);
    for _ in 0..=NAMES.len() {
        let (entries, next) = resolve::services(snapshot, Instant::now(), after.as_deref(), prefix, page);
        assert!(entries.len() <= page);
        got.extend(entries.into_iter().map(|s| s.service));
        let Some(next) = next else { break };
        let header = encode(&next).to_string();
        let q = parse_query(&format!("after={header}&prefix={}", encode(prefix)));
        after = q.get("after").cloned();
        assert_eq!(after.as_deref(), Some(next.as_str()), "the cursor came back changed");
    }
    assert_eq!(got, want, "paging by {page} from {first_after:?} with prefix {prefix:?}");
}
