//! The agent above the kernel, in-process and unprivileged: HTTP retries and budgets,
//! replayed bodies, the upstream pool, timeouts, agent-made answers (plain and gRPC), the
//! override header, forced protocol modes, server-speaks-first detection, tunnels and the
//! admin API; real hyper endpoints and clients on loopback (see `support`).

mod support;

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, StatusCode};
use support::{Endpoint, H1, H2, Scratch, agent, answer, eventually, refused};
use switchyard::origin::Fixed;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const WEB: &str = "10.96.0.1:80";

fn web() -> Fixed {
    Fixed::all(WEB.parse().unwrap())
}

fn client_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_retryable_statuses_within_the_budget_and_a_spent_budget_stops_them() {
    let bad = Endpoint::fixed(503, "bad").await;
    let good = Endpoint::fixed(200, "good").await;
    let only_bad = Endpoint::fixed(503, "down").await;
    let services = format!(
        r#"  - {{ name: web, addresses: ["{WEB}"], endpoints: ["{}", "{}"], balance: round-robin,
        failure_accrual: {{ consecutive_failures: 1000 }} }}
  - {{ name: storm, addresses: ["10.96.0.2:80"], endpoints: ["{}"],
        http: {{ retry: {{ budget_ratio: 0.0, budget_min_per_second: 1, budget_window: 1s }} }} }}
"#,
        bad.addr, good.addr, only_bad.addr
    );
    let origins = web().with(client_ip(2), "10.96.0.2:80".parse().unwrap());
    let a = agent("", &services, origins).await;
    let mut c = H1::connect(a.proxy).await;
    for _ in 0..20 {
        let got = c.get("/").await;
        assert_eq!((got.status, got.text().as_str()), (StatusCode::OK, "good"), "a 503 must be retried elsewhere");
    }
    assert!(bad.requests() >= 5, "round robin sends first attempts to the bad endpoint too: {}", bad.requests());
    assert_eq!(good.requests(), 20);
    let retried = a.metric(r#"switchyard_http_retries_total{service="web",reason="status"}"#).await;
    assert_eq!(retried, Some(bad.requests() as f64), "every 503 was retried once");

    // A service that is down: retries would triple its load; the budget allows one.
    let mut storm = H1::over(a.dial_from(client_ip(2)).await).await;
    for _ in 0..20 {
        assert_eq!(storm.get("/").await.status, StatusCode::SERVICE_UNAVAILABLE, "the endpoint's own answer");
    }
    assert!(
        (20..=22).contains(&only_bad.requests()),
        "a spent budget stops retries: {} requests for 20",
        only_bad.requests()
    );
    let spent = a.metric(r#"switchyard_http_retry_budget_exhausted_total{service="storm"}"#).await.unwrap_or(0.0);
    assert!(spent >= 18.0, "budget exhaustion counted: {spent}");
}

/// An endpoint that reads the whole body, records its length, and answers `status`
/// with the body echoed.
fn echo_body(status: u16, seen: Arc<Mutex<Vec<usize>>>) -> support::Handler {
    Arc::new(move |req| {
        let seen = Arc::clone(&seen);
        Box::pin(async move {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            seen.lock().unwrap().push(body.len());
            answer(status, body)
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_is_replayed_on_another_endpoint_when_it_fits_the_limit() {
    let (seen_a, seen_b) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let failing = Endpoint::h1(echo_body(503, Arc::clone(&seen_a))).await;
    let healthy = Endpoint::h1(echo_body(200, Arc::clone(&seen_b))).await;
    let policy = "balance: round-robin, failure_accrual: { consecutive_failures: 1000 }";
    let services = format!(
        r#"  - {{ name: web, addresses: ["{WEB}"], endpoints: ["{a}", "{b}"], {policy} }}
  - {{ name: small, addresses: ["10.96.0.2:80"], endpoints: ["{a}", "{b}"], {policy},
        http: {{ retry: {{ max_body: 1024 }} }} }}
"#,
        a = failing.addr,
        b = healthy.addr
    );
    let a = agent("", &services, web().with(client_ip(2), "10.96.0.2:80".parse().unwrap())).await;
    let payload: Bytes = (0..20_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    let post = || Request::post("/upload").header("host", "svc").body(Full::new(payload.clone())).unwrap();
    let mut c = H1::connect(a.proxy).await;
    for _ in 0..4 {
        let got = c.send(post()).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, payload, "the endpoint that answered got the whole body");
    }
    assert!(!seen_a.lock().unwrap().is_empty(), "some first attempts went to the failing endpoint");
    assert!(seen_a.lock().unwrap().iter().all(|&n| n == payload.len()), "the first attempt streamed it all");

    // Over max_body: nothing is kept, so a failed attempt is the answer.
    let mut small = H1::over(a.dial_from(client_ip(2)).await).await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        statuses.push(small.send(post()).await.status.as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 503], "round robin: one request met the failing endpoint and was not replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_across_clients_and_closed_when_idle() {
    let ep = Endpoint::fixed(200, "ok").await;
    let services = format!(
        "  - {{ name: web, addresses: [\"{WEB}\"], endpoints: [\"{}\"], protocol: http1, http: {{ pool_idle_timeout: 400ms }} }}\n",
        ep.addr
    );
    let a = agent("", &services, web()).await;
    for _ in 0..5 {
        // A new client connection each time: the upstream one is the pool's.
        assert_eq!(H1::connect(a.proxy).await.get("/").await.status, StatusCode::OK);
    }
    assert_eq!((ep.requests(), ep.connections()), (5, 1), "five requests over one pooled upstream connection");
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(H1::connect(a.proxy).await.get("/").await.status, StatusCode::OK);
    assert_eq!(ep.connections(), 2, "the idle connection expired; a new one was opened");
}

/// An HTTP/1 upstream connection is driven by the request using it (no task of its own):
/// it must come back to the pool whatever the response was (a body read in many reads, a
/// HEAD answer, a 204, a body the client never reads because the request was HEAD), and
/// one the endpoint closed while it sat idle must be found out when it is next taken,
/// before a request is written to it. One attempt per request: a request sent on a dead
/// connection would fail, not be hidden by a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_http1_connections_come_back_after_any_response_and_a_closed_one_is_replaced() {
    let big = Bytes::from(vec![b'x'; 1 << 20]);
    let ep = Endpoint::h1(support::reply(move |req| match req.uri().path() {
        "/big" => answer(200, big.clone()),
        "/none" => answer(204, ""),
        _ => answer(200, "ok"),
    }))
    .await;
    // An endpoint that closes each connection after one response, without saying so
    // (no `connection: close`): the pooled connection dies while idle.
    let (closing_addr, accepted, server) = one_answer_each(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let services = format!(
        r#"  - {{ name: web, addresses: ["{WEB}"], endpoints: ["{}"], protocol: http1, http: {{ retry: {{ attempts: 1 }} }} }}
  - {{ name: closing, addresses: ["10.96.0.2:80"], endpoints: ["{closing_addr}"], protocol: http1, http: {{ retry: {{ attempts: 1 }} }} }}
"#,
        ep.addr
    );
    let a = agent("", &services, web().with(client_ip(2), "10.96.0.2:80".parse().unwrap())).await;
    let mut client = H1::connect(a.proxy).await;
    let req = |method: &str, path: &str| {
        Request::builder().method(method).uri(path).header("host", "svc").body(Full::default()).unwrap()
    };
    for (method, path, status, len) in [
        ("GET", "/big", 200, 1 << 20),
        ("HEAD", "/big", 200, 0),
        ("GET", "/none", 204, 0),
        ("GET", "/", 200, 2),
        ("GET", "/big", 200, 1 << 20),
    ] {
        let got = client.send(req(method, path)).await;
        assert_eq!((got.status.as_u16(), got.body.len()), (status, len), "{method} {path}");
    }
    assert_eq!((ep.requests(), ep.connections()), (5, 1), "one upstream connection, back in the pool after each");

    let mut client = H1::over(a.dial_from(client_ip(2)).await).await;
    for i in 0..3 {
        // Time for the endpoint's close to reach the agent.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = client.get("/").await;
        assert_eq!(
            (got.status, got.header("switchyard-error"), got.text()),
            (StatusCode::OK, None, "ok".into()),
            "request {i}"
        );
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3, "each closed connection was replaced");
    server.abort();
}

/// An endpoint's connection fields are its own hop's: an HTTP/1.0 answer delimited by
/// its close, with `Connection: close` and `Keep-Alive`, reaches a keep-alive HTTP/1.1
/// client whole, without those fields and without closing the client's connection; an
/// HTTP/1.0 client gets it delimited by its own connection's close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoints_close_and_framing_stay_on_its_own_hop() {
    let answer = b"HTTP/1.0 200 OK\r\nconnection: close\r\nkeep-alive: timeout=5\r\nx-app: kept\r\n\r\nall of it";
    let (addr, accepted, server) = one_answer_each(answer).await;
    let services = format!(r#"  - {{ name: web, addresses: ["{WEB}"], endpoints: ["{addr}"], protocol: http1 }}"#);
    let a = agent("", &services, web()).await;
    let mut client = H1::connect(a.proxy).await;
    for i in 0..2 {
        let got = client.get("/").await;
        assert_eq!((got.status, got.text()), (StatusCode::OK, "all of it".into()), "request {i}");
        assert_eq!(got.header("x-app"), Some("kept"), "end-to-end fields pass");
        assert_eq!((got.header("connection"), got.header("keep-alive")), (None, None), "request {i}: {got:?}");
    }
    assert!(!client.closed().await, "the client's connection stays open");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the endpoint's closed connections were not reused"
    );
    // An HTTP/1.0 client (no Host) gets a body of unknown length delimited by the close.
    let mut old = tokio::net::TcpStream::connect(a.proxy).await.unwrap();
    old.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), old.read_to_string(&mut answer)).await.unwrap().unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole head");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{answer:?}");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{answer:?}");
    assert_eq!(body, "all of it");
    server.abort();
}

/// An endpoint that writes `answer` once on each connection, after the request head,
/// and then closes it without saying so; it counts the connections it accepted.
async fn one_answer_each(
    answer: &'static [u8],
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
            });
        }
    });
    (addr, accepted, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_unreachable_endpoints_get_answers_the_agent_makes_plain_or_grpc() {
    let hung = Endpoint::h1(Arc::new(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            answer(200, "late")
        })
    }))
    .await;
    let dead = refused().await;
    let services = format!(
        r#"  - {{ name: slow, addresses: ["{WEB}"], endpoints: ["{}"], http: {{ request_timeout: 300ms }} }}
  - {{ name: gone, addresses: ["10.96.0.2:80"], endpoints: ["{dead}"], connect: {{ attempts: 1 }} }}
  - {{ name: grpc, addresses: ["10.96.0.3:80"], endpoints: ["{dead}"], connect: {{ attempts: 1 }}, protocol: http2 }}
"#,
        hung.addr
    );
    let origins =
        web().with(client_ip(2), "10.96.0.2:80".parse().unwrap()).with(client_ip(3), "10.96.0.3:80".parse().unwrap());
    let a = agent("", &services, origins).await;
    let started = Instant::now();
    let got = H1::connect(a.proxy).await.get("/").await;
    assert_eq!((got.status, got.header("switchyard-error")), (StatusCode::GATEWAY_TIMEOUT, Some("request_timeout")));
    assert!(started.elapsed() < Duration::from_secs(3), "the request timeout cut it: {:?}", started.elapsed());

    let got = H1::over(a.dial_from(client_ip(2)).await).await.get("/").await;
    assert_eq!((got.status, got.header("switchyard-error")), (StatusCode::BAD_GATEWAY, Some("connect_failed")));
    assert_eq!(got.text(), "switchyard: connect_failed\n");

    // A gRPC client gets a gRPC status it understands, not an HTTP error.
    let call = Request::post("http://svc/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap();
    let got = H2::over(a.dial_from(client_ip(3)).await).await.send(call).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!((got.header("grpc-status"), got.header("switchyard-error")), (Some("14"), Some("connect_failed")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_is_retried_per_call_on_one_channel() {
    // Trailers-only answers, after reading the request as a gRPC server does.
    let grpc = |code: &'static str| -> support::Handler {
        Arc::new(move |req| {
            Box::pin(async move {
                let _ = req.into_body().collect().await;
                hyper::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", code)
                    .body(Full::default())
                    .unwrap()
            })
        })
    };
    let unavailable = Endpoint::h2(grpc("14")).await;
    let fine = Endpoint::h2(grpc("0")).await;
    let services = format!(
        "  - {{ name: web, addresses: [\"{WEB}\"], endpoints: [\"{}\", \"{}\"], balance: round-robin, protocol: http2, failure_accrual: {{ consecutive_failures: 1000 }} }}\n",
        unavailable.addr, fine.addr
    );
    let a = agent("", &services, web()).await;
    let mut channel = H2::over(tokio::net::TcpStream::connect(a.proxy).await.unwrap()).await;
    for _ in 0..10 {
        let call = Request::post("http://svc/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let got = channel.send(call).await;
        assert_eq!(got.header("grpc-status"), Some("0"), "UNAVAILABLE is retried elsewhere: {got:?}");
    }
    assert!(unavailable.requests() >= 3, "calls on one channel were balanced one by one: {}", unavailable.requests());
    assert_eq!(fine.requests(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_override_header_moves_requests_only_to_allowed_services() {
    let (stable, canary, other) = (
        Endpoint::fixed(200, "stable").await,
        Endpoint::fixed(200, "canary").await,
        Endpoint::fixed(200, "other").await,
    );
    let services = format!(
        r#"  - {{ name: web, addresses: ["{WEB}"], endpoints: ["{}"], http: {{ allow_override: [canary] }} }}
  - {{ name: canary, endpoints: ["{}"] }}
  - {{ name: other, addresses: ["10.96.0.9:80"], endpoints: ["{}"] }}
"#,
        stable.addr, canary.addr, other.addr
    );
    let a = agent("", &services, web()).await;
    let mut c = H1::connect(a.proxy).await;
    let with =
        |dtab: &str| Request::get("/").header("host", "svc").header("l5d-dtab", dtab).body(Full::default()).unwrap();
    assert_eq!(c.send(with("/svc/web => /svc/canary")).await.text(), "canary");
    assert_eq!(c.send(with("/svc/web => /svc/other")).await.text(), "stable", "not in allow_override: ignored");
    assert_eq!(c.get("/").await.text(), "stable");
    assert_eq!(other.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_protocol_decides_whether_requests_or_connections_are_balanced() {
    let (one, two) = (Endpoint::fixed(200, "one").await, Endpoint::fixed(200, "two").await);
    let services = format!(
        r#"  - {{ name: opaque, addresses: ["10.96.0.1:80"], endpoints: ["{a}", "{b}"], balance: round-robin, protocol: tcp }}
  - {{ name: http, addresses: ["10.96.0.2:80"], endpoints: ["{a}", "{b}"], balance: round-robin, protocol: http1 }}
"#,
        a = one.addr,
        b = two.addr
    );
    let origins = Fixed::default()
        .with(client_ip(2), "10.96.0.1:80".parse().unwrap())
        .with(client_ip(3), "10.96.0.2:80".parse().unwrap());
    let a = agent("", &services, origins).await;
    let mut opaque = H1::over(a.dial_from(client_ip(2)).await).await;
    assert_eq!(six_answers(&mut opaque).await.len(), 1, "protocol: tcp keeps one endpoint per connection");
    let mut http = H1::over(a.dial_from(client_ip(3)).await).await;
    assert_eq!(six_answers(&mut http).await, ["one", "two"], "protocol: http1 balances each request");
}

/// The distinct answers to six requests on one connection.
async fn six_answers(c: &mut H1) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(c.get("/").await.text());
    }
    seen.sort();
    seen.dedup();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_speaks_first_is_not_stalled_by_detection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner_at = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"220 smtp ready\r\n").await;
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let services = format!("  - {{ name: mail, addresses: [\"{WEB}\"], endpoints: [\"{banner_at}\"] }}\n");
    // A detect timeout far longer than the wait below: only speculation can pass.
    let a = agent("detect: { timeout: 10s }", &services, web()).await;
    let mut c = tokio::net::TcpStream::connect(a.proxy).await.unwrap();
    let mut buf = [0u8; 64];
    let n =
        tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf)).await.expect("the banner within 3 s").unwrap();
    assert_eq!(&buf[..n], b"220 smtp ready\r\n");
    let conns = a.admin_json("/conns").await;
    assert_eq!(conns[0]["protocol"], "tcp", "{conns}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_are_tunnelled_with_the_counted_copy() {
    let echo = Endpoint::h1(Arc::new(|mut req| {
        Box::pin(async move {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = upgrade.await else { return };
                let mut io = hyper_util::rt::TokioIo::new(up);
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = io.read(&mut buf).await {
                    if io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            hyper::Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(Full::default())
                .unwrap()
        })
    }))
    .await;
    let services = format!("  - {{ name: web, addresses: [\"{WEB}\"], endpoints: [\"{}\"] }}\n", echo.addr);
    let a = agent("", &services, web()).await;
    let mut c = tokio::net::TcpStream::connect(a.proxy).await.unwrap();
    let request = b"GET /ws HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
    c.write_all(request).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    c.write_all(b"through the tunnel").await.unwrap();
    let mut back = [0u8; 18];
    c.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"through the tunnel");
    let series =
        |dir: &str| format!(r#"switchyard_bytes_total{{service="web",endpoint="{}",direction="{dir}"}}"#, echo.addr);
    // Counted as the bytes move, while the tunnel is open, and as they cross the wire:
    // the upgrade's request and response heads too, not only the tunnelled bytes. The
    // client's side exactly; the endpoint's side has the head hyper wrote and read there.
    let conns = a.admin_json("/conns").await;
    let client_side = (conns[0]["bytes_out"].as_u64(), conns[0]["bytes_in"].as_u64());
    assert_eq!(client_side, (Some(request.len() as u64 + 18), Some(head.len() as u64 + 18)), "{conns}");
    for dir in ["out", "in"] {
        let bytes = a.metric(&series(dir)).await.unwrap_or(0.0);
        assert!(bytes > 18.0 + 30.0, "{dir}: the head and the tunnelled 18 bytes, {bytes}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_shows_services_connections_resolution_and_metrics() {
    let ep = Endpoint::fixed(200, "ok").await;
    let services = format!("  - {{ name: web, addresses: [\"{WEB}\"], endpoints: [\"{}\"] }}\n", ep.addr);
    let a = agent("", &services, web()).await;
    let mut c = H1::connect(a.proxy).await;
    assert_eq!(c.get("/").await.status, StatusCode::OK);
    // The client connection is still open: it is in the table.
    let conns = a.admin_json("/conns").await;
    let conn = &conns[0];
    assert_eq!((conn["service"].as_str(), conn["protocol"].as_str()), (Some("web"), Some("http/1")), "{conns}");
    assert_eq!(conn["requests"], 1);
    assert_eq!(conn["client"]["original_dst"], WEB);
    let services = a.admin_json("/services").await;
    assert_eq!(services[0]["service"], "web");
    assert_eq!(services[0]["endpoints"][0]["health"], "healthy");
    assert_eq!(services[0]["endpoints"][0]["responses_ok"], 1, "{services}");
    let tree = a.admin_json("/resolve?target=10.96.0.1:80").await;
    assert_eq!((tree["service"].as_str(), tree["healthy"].as_bool()), (Some("web"), Some(true)));
    let series = format!(r#"switchyard_http_requests_total{{service="web",endpoint="{}",status="200"}}"#, ep.addr);
    assert_eq!(a.metric(&series).await, Some(1.0));
    assert_eq!(a.admin_get("/resolve?target=nope").await.0, StatusCode::NOT_FOUND);
    drop(c);
    eventually("a closed connection leaves the table", Duration::from_secs(5), || async {
        a.admin_json("/conns").await.as_array().unwrap().is_empty()
    })
    .await;
    assert_eq!(a.admin_json("/status").await["rejected"], serde_json::json!({}), "nothing was rejected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_catalog_is_rejected_and_the_last_good_state_keeps_serving() {
    let (one, two) = (Endpoint::fixed(200, "one").await, Endpoint::fixed(200, "two").await);
    let dir = Scratch::new("catalog");
    let catalog = dir.0.join("catalog.yaml");
    let write = |endpoint: &str| {
        let text = format!("services:\n  - {{ name: web, addresses: [\"{WEB}\"], endpoints: [\"{endpoint}\"] }}\n");
        std::fs::write(&catalog, text).unwrap();
    };
    write(&one.addr.to_string());
    let a = agent(&format!("catalog: \"{}\"", catalog.display()), "  []\n", web()).await;
    assert_eq!(H1::connect(a.proxy).await.get("/").await.text(), "one");

    // A catalog that does not parse: refused, said in /status naming the field, and
    // nothing else changes.
    std::fs::write(&catalog, "services:\n  - { name: web, addresses: [nonsense] }\n").unwrap();
    eventually("the catalog's rejection in /status", Duration::from_secs(10), || async {
        let status = a.admin_json("/status").await;
        status["rejected"]["catalog"]["error"].as_str().is_some_and(|e| e.contains("services[0].addresses[0]"))
    })
    .await;
    assert_eq!(H1::connect(a.proxy).await.get("/").await.text(), "one", "the last good state serves");

    // An empty file (a save caught between its truncate and its write) is not "no
    // services": nothing changes.
    std::fs::write(&catalog, "").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(H1::connect(a.proxy).await.get("/").await.text(), "one", "an empty catalog removes nothing");

    // A good one again: applied, and its endpoint serves.
    write(&two.addr.to_string());
    eventually("the new endpoint serves", Duration::from_secs(10), || async {
        H1::connect(a.proxy).await.get("/").await.text() == "two"
    })
    .await;
    assert_eq!(a.admin_json("/status").await["last_applied_source"], "catalog");
}

/// A connection the agent accepted just before it stopped (an upgrade's outgoing agent
/// accepts until its successor is ready) still has its first request answered, sent
/// after the stop: HTTP/1.1 with `connection: close` and then the close (detected and
/// forced), HTTP/2 with a GOAWAY (forced: a detected client as silent as this one is
/// found out by the endpoint's SETTINGS, which an HTTP/2 server sends first, and
/// relayed opaquely). hyper alone closes such a connection unread. A keep-alive
/// connection idle at the stop is closed at once, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_accepted_as_the_agent_stops_has_its_first_request_answered() {
    let one = Endpoint::fixed(200, "one").await;
    let two = Endpoint::h2(support::reply(|_| answer(200, "two"))).await;
    let services = format!(
        r#"  - {{ name: detected, addresses: ["{WEB}"], endpoints: ["{}"] }}
  - {{ name: forced1, addresses: ["10.96.0.2:80"], endpoints: ["{}"], protocol: http1 }}
  - {{ name: forced2, addresses: ["10.96.0.3:80"], endpoints: ["{}"], protocol: http2 }}
"#,
        one.addr, one.addr, two.addr
    );
    let origins =
        web().with(client_ip(2), "10.96.0.2:80".parse().unwrap()).with(client_ip(3), "10.96.0.3:80".parse().unwrap());
    // Detection waits long enough for the requests sent after the stop.
    let a = agent("detect: { timeout: 5s }", &services, origins).await;
    let mut idle = H1::connect(a.proxy).await;
    assert_eq!(idle.get("/").await.text(), "one");
    let mut fresh = Vec::new();
    for n in 1..=3 {
        fresh.push(a.dial_from(client_ip(n)).await);
    }
    eventually("the agent has accepted all four connections", Duration::from_secs(10), || async {
        a.admin_json("/conns").await.as_array().map_or(0, Vec::len) == 4
    })
    .await;
    a.shutdown();
    // Long enough for every connection task to see the stop (hyper alone closes an idle
    // connection within a poll of it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let [detected, forced1, forced2] = <[_; 3]>::try_from(fresh).unwrap();
    for (stream, name) in [(detected, "detected"), (forced1, "forced http1")] {
        let (status, head, body) = raw_get(stream, name).await;
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "one"), "{name}: {head}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{name}: the answer says it closes: {head}");
    }
    // With h2's client, not hyper's: hyper's fails a request it has already sent when the
    // agent's graceful GOAWAY (last stream 2^31-1, then the last one read) crosses it, and
    // resets the stream the agent was answering (hyperium/hyper#2500). That was 1 run in
    // 40 and 1 in 80 of this test; with h2's client, none in 80.
    let (status, body) = h2_get(forced2).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "two"), "forced http2");
    // The connection that had served a request and sat idle was closed at the stop.
    assert!(idle.closed().await, "an idle keep-alive connection is closed when the agent stops");
    a.stop(Duration::from_secs(10)).await;
}

/// A GET over HTTP/2 on `stream` with the h2 crate's client (which finishes a stream the
/// server's GOAWAY still covers): the status and the body.
async fn h2_get(stream: tokio::net::TcpStream) -> (StatusCode, String) {
    let (client, conn) = h2::client::handshake(stream).await.expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("the connection takes a request");
    let (response, _) =
        client.send_request(Request::get("http://svc/").body(()).unwrap(), true).expect("the request is sent");
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("a response within 10 s")
        .expect("a response, not a stream error");
    let (parts, mut body) = response.into_parts();
    let mut text = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the body");
        let _ = body.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    (parts.status, String::from_utf8_lossy(&text).into_owned())
}

/// A GET written by hand on `stream` (the connection `name`), its answer read to the
/// server's close: (status line, head, body).
async fn raw_get(mut stream: tokio::net::TcpStream, name: &str) -> (String, String, String) {
    stream.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let so_far = String::from_utf8_lossy(&answer);
    read.unwrap_or_else(|_| panic!("{name}: the agent answers and closes within 10 s; read {so_far:?}"))
        .unwrap_or_else(|e| panic!("{name}: a clean close, not {e}; read {so_far:?}"));
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or_default().to_owned(), head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_background_task_and_the_agent_ends() {
    let ep = Endpoint::fixed(200, "ok").await;
    let services = format!(
        "  - {{ name: web, addresses: [\"{WEB}\"], endpoints: [\"{}\"], health_check: {{ kind: http, interval: 50ms }} }}\n",
        ep.addr
    );
    let a = agent("", &services, web()).await;
    eventually("health checks reach the endpoint", Duration::from_secs(10), || async { ep.requests() >= 3 }).await;
    a.stop(Duration::from_secs(10)).await;
    let after_stop = ep.requests();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ep.requests(), after_stop, "no health check runs after shutdown");
}
