//! Protocol policy: how the agent decides what a connection speaks (agent-wide
//! `detect`, per-service `protocol`), and what it does per HTTP request (`http`:
//! timeouts, retries under a budget, the routing override header). See docs/http.md.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a service's connections speak.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Look at the client's first bytes (HTTP/1.x, HTTP/2 preface, TLS, else opaque);
    /// ports in `agent.detect.opaque_ports` are never looked at.
    #[default]
    Auto,
    /// Opaque bytes, balanced per connection, no detection wait.
    Tcp,
    /// HTTP/1.x, balanced per request.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC), balanced per request.
    Http2,
}

/// Agent-wide protocol detection.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// How long to wait for a client's first bytes before treating the connection as
    /// opaque TCP. This is the longest a server-speaks-first protocol on a port not
    /// listed below can stall (linkerd2 waits 10 s).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Destination ports that are always opaque: server-speaks-first protocols (SMTP,
    /// MySQL, PostgreSQL's cancel path, ...) never wait. linkerd2's default list.
    pub opaque_ports: Vec<u16>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_millis(100), opaque_ports: vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211] }
    }
}

/// What the agent accepts from HTTP clients, against hostile or broken ones (slowloris,
/// huge headers, stream floods). Defaults follow hyper's and Envoy's.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// HTTP/1: a request's head must arrive within this, counted from when the connection
    /// is ready for it (so a keep-alive connection idle this long is closed too, as
    /// nginx's keepalive_timeout does). `null`: no limit. hyper's default.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// A client connection with no request in flight this long is closed (HTTP/2 with
    /// GOAWAY): what bounds an HTTP/2 connection held open without streams. `null`: no
    /// limit. Envoy's default, 1 hour.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// A request's headers (HTTP/1: with the request line; HTTP/2: the decoded header
    /// list) may be this large; larger gets 431 (HTTP/1) or a stream reset (HTTP/2) and
    /// never reaches an endpoint. Envoy's default, 60 KiB.
    pub max_header_bytes: u32,
    /// HTTP/2 streams a client may have open at once on one connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS); more are refused. hyper's default.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the agent has served them (rapid reset,
    /// CVE-2023-44487): past this the connection ends with GOAWAY. h2's default.
    pub max_pending_reset_streams: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_header_bytes: 60 * 1024,
            max_concurrent_streams: 200,
            max_pending_reset_streams: 20,
        }
    }
}

/// hyper's smallest HTTP/1 read buffer: a header limit below it could not be enforced.
pub const MIN_HEADER_BYTES: u32 = 8 * 1024;

/// Per-request policy of an HTTP service.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// From the request to the response headers, over all attempts; then 504. Bodies
    /// stream on without a limit (long gRPC streams are not cut). `null`: no limit.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// One attempt may wait this long for response headers before it counts as a
    /// failure and the request may be retried elsewhere. `null`: the request timeout.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Option<Duration>,
    pub retry: RetryConfig,
    /// Services the `l5d-dtab` request header may send this service's requests to
    /// (`/svc/<this> => /svc/<other>`). Empty: the header is ignored.
    pub allow_override: Vec<String>,
    /// Idle upstream connections are closed after this long.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            request_timeout: Some(Duration::from_secs(15)),
            attempt_timeout: None,
            retry: RetryConfig::default(),
            allow_override: Vec::new(),
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Retries on another endpoint. Any request is retried when its attempt never reached a
/// server (connect failed) or the server answered with a retryable status (it did not
/// act on it); idempotent requests are retried also after a timeout or a broken
/// connection. Only requests whose whole body fitted in `max_body` can be replayed.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per request, the first included (1: no retries).
    pub attempts: u32,
    /// Response statuses that are retried.
    pub on_status: Vec<u16>,
    /// gRPC statuses (numeric codes, in a trailers-only response) that are retried;
    /// 14 is UNAVAILABLE.
    pub on_grpc: Vec<u32>,
    /// Request bodies up to this many bytes are kept for replay.
    pub max_body: usize,
    /// Retry budget (Finagle): retries may add this share of the requests of the last
    /// `budget_window`...
    pub budget_ratio: f64,
    /// ...plus this many per second, so a quiet service can still retry.
    pub budget_min_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub budget_window: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 3,
            on_status: vec![503],
            on_grpc: vec![14],
            max_body: 64 * 1024,
            budget_ratio: 0.2,
            budget_min_per_second: 10,
            budget_window: Duration::from_secs(10),
        }
    }
}

impl HttpConfig {
    /// Problems, named under `at` (e.g. `services[2].http`).
    pub(super) fn problems(&self, at: &str, problem: &mut impl FnMut(String, String)) {
        for (name, t) in [("request_timeout", self.request_timeout), ("attempt_timeout", self.attempt_timeout)] {
            if t.is_some_and(|t| t.is_zero()) {
                problem(format!("{at}.{name}"), "must be more than 0 (or null for no limit)".into());
            }
        }
        if self.pool_idle_timeout.is_zero() {
            problem(format!("{at}.pool_idle_timeout"), "must be more than 0".into());
        }
        let r = &self.retry;
        if !(1..=10).contains(&r.attempts) {
            problem(format!("{at}.retry.attempts"), format!("{} is not between 1 and 10", r.attempts));
        }
        for s in &r.on_status {
            if !(100..=599).contains(s) {
                problem(format!("{at}.retry.on_status"), format!("{s} is not an HTTP status"));
            }
        }
        for c in &r.on_grpc {
            if *c > 16 {
                problem(format!("{at}.retry.on_grpc"), format!("{c} is not a gRPC status code (0 to 16)"));
            }
        }
        if !(0.0..=10.0).contains(&r.budget_ratio) {
            problem(format!("{at}.retry.budget_ratio"), format!("{} is not between 0 and 10", r.budget_ratio));
        }
        if r.budget_window < Duration::from_secs(1) || r.budget_window > Duration::from_secs(60) {
            problem(format!("{at}.retry.budget_window"), "must be between 1s and 60s".into());
        }
    }
}

impl DetectConfig {
    pub(super) fn problems(&self, problem: &mut impl FnMut(String, String)) {
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(10) {
            problem("agent.detect.timeout".into(), "must be more than 0 and at most 10s".into());
        }
        if self.opaque_ports.contains(&0) {
            problem("agent.detect.opaque_ports".into(), "0 is not a port".into());
        }
    }
}

impl HttpLimits {
    pub(super) fn problems(&self, problem: &mut impl FnMut(String, String)) {
        let at = "agent.http_limits";
        if self.header_read_timeout.is_some_and(|t| t.is_zero()) {
            problem(format!("{at}.header_read_timeout"), "must be more than 0 (or null for no limit)".into());
        }
        if self.idle_timeout.is_some_and(|t| t.is_zero()) {
            problem(format!("{at}.idle_timeout"), "must be more than 0 (or null for no limit)".into());
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            problem(
                format!("{at}.max_header_bytes"),
                format!("{} is below {MIN_HEADER_BYTES}, the least an HTTP/1 read buffer holds", self.max_header_bytes),
            );
        }
        if self.max_concurrent_streams == 0 {
            problem(format!("{at}.max_concurrent_streams"), "must be at least 1".into());
        }
        if self.max_pending_reset_streams == 0 {
            problem(format!("{at}.max_pending_reset_streams"), "must be at least 1".into());
        }
    }
}
