//! In-process harness: the whole agent (`app::build` with `Kernel::None`) on ephemeral
//! loopback ports, real hyper endpoints and clients, no root. Original destinations come
//! from a fixed table (`origin::Fixed`): the one part of the kernel side these tests
//! replace. What needs the kernel (redirect, pods, lifecycle) is tested by `tests/`.

#![allow(dead_code)]

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{HeaderMap, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchyard::{
    admin::LogControl,
    app::{self, Bound, Kernel},
    config::Config,
    origin::Fixed,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A running in-process agent; shut down when dropped.
pub struct Agent {
    bound: Option<Bound>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

/// Start an agent with `agent:` settings `agent` (YAML flow mapping entries, may be
/// empty) and the `services:` list `services`, with original destinations from `origins`.
pub async fn agent(agent: &str, services: &str, origins: Fixed) -> Agent {
    let sep = if agent.is_empty() { "" } else { ", " };
    let yaml = format!("agent: {{ admin: \"127.0.0.1:0\"{sep}{agent} }}\nservices:\n{services}");
    let config = Config::parse(&yaml, Path::new("inprocess.yaml")).unwrap_or_else(|e| panic!("{e:#}\n{yaml}"));
    let log: LogControl = Arc::new(|_| Ok("info".into()));
    let bound = app::build(config, None, Kernel::None(Arc::new(origins)), log).await.expect("the agent starts");
    let proxy = *bound.proxy.iter().find(|a| a.is_ipv4()).expect("a v4 listener");
    let admin = bound.admin.expect("the admin API is on");
    Agent { bound: Some(bound), proxy, admin }
}

impl Agent {
    /// GET `path` from the admin API: (status, body).
    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        let mut c = H1::connect(self.admin).await;
        let r = c.send(Request::get(path).header("host", "admin").body(Full::default()).unwrap()).await;
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    }

    /// The admin API's JSON at `path`.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.admin_get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The value of the metric line starting with `series` (name and labels), if any.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// A client connection to the proxy listener from `from` (a 127/8 address, which
    /// the fixed origin table may map to a service).
    pub async fn dial_from(&self, from: IpAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        socket.connect(self.proxy).await.expect("connect to the agent")
    }
}

impl Agent {
    /// Begin shutting down: the agent stops accepting and drains (see `stop`).
    pub fn shutdown(&self) {
        self.bound.as_ref().expect("running").shutdown();
    }

    /// Shut down and wait until the agent has stopped (at most `limit`).
    pub async fn stop(mut self, limit: Duration) {
        let bound = self.bound.take().expect("running");
        bound.shutdown();
        tokio::time::timeout(limit, bound.wait()).await.expect("the agent stops in time").expect("a clean stop");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(b) = &self.bound {
            b.shutdown();
        }
    }
}

/// A directory of its own for a test's files, removed when dropped.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("switchyard-inprocess-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Wait (at most `within`) until `check` holds.
pub async fn eventually<F: Future<Output = bool>>(what: &str, within: Duration, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub type Reply = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> Reply + Send + Sync>;

/// An HTTP endpoint: a real hyper server on an ephemeral loopback port, counting the
/// connections and requests it gets.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    pub async fn h1(handler: Handler) -> Self {
        Self::serve(false, handler).await
    }

    pub async fn h2(handler: Handler) -> Self {
        Self::serve(true, handler).await
    }

    async fn serve(h2: bool, handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (connections, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (handler, r) = (Arc::clone(&handler), Arc::clone(&r));
                let svc = service_fn(move |req| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let reply = handler(req);
                    async move { Ok::<_, Infallible>(reply.await) }
                });
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    let _ = if h2 {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc).await
                    } else {
                        hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades().await
                    };
                });
            }
        });
        Self { addr, connections, requests, task }
    }

    /// An endpoint that answers every request with `status` and `body`.
    pub async fn fixed(status: u16, body: &'static str) -> Self {
        Self::h1(reply(move |_| answer(status, body))).await
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A handler from a synchronous function of the request.
pub fn reply(f: impl Fn(Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static) -> Handler {
    Arc::new(move |req| {
        let resp = f(req);
        Box::pin(async move { resp })
    })
}

pub fn answer(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder().status(status).body(Full::new(body.into())).unwrap()
}

/// A loopback address nothing listens on (a port bound and released).
pub async fn refused() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

/// A response as a client got it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1.1 client connection (hyper's client), kept alive across requests.
pub struct H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl H1 {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::over(TcpStream::connect(addr).await.expect("connect")).await
    }

    pub async fn over(stream: TcpStream) -> Self {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Self(sender)
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Got {
        self.0.ready().await.expect("the connection takes another request");
        response(self.0.send_request(req)).await
    }

    pub async fn get(&mut self, path: &str) -> Got {
        self.send(Request::get(path).header("host", "svc").body(Full::default()).unwrap()).await
    }
    /// Whether the server has closed the connection (waits for hyper to see it).
    pub async fn closed(&mut self) -> bool {
        self.0.ready().await.is_err()
    }
}

/// An HTTP/2 (prior knowledge) client connection.
pub struct H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>);

impl H2 {
    pub async fn over(stream: TcpStream) -> Self {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        Self(sender)
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Got {
        response(self.0.send_request(req)).await
    }
}

/// The response to a request sent (within 20 s), body and trailers read.
async fn response(sent: impl Future<Output = hyper::Result<Response<Incoming>>>) -> Got {
    let resp =
        tokio::time::timeout(Duration::from_secs(20), sent).await.expect("a response within 20 s").expect("a response");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("the response body");
    let mut headers = parts.headers;
    if let Some(trailers) = collected.trailers() {
        headers.extend(trailers.clone());
    }
    Got { status: parts.status, headers, body: collected.to_bytes() }
}
