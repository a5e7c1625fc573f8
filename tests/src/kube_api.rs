//! A stand-in for the Kubernetes API server: no real one can be installed here, so the
//! agent's Kubernetes source is tested against this instead. It is not a mock of the
//! agent's code: it speaks the real HTTP list/watch protocol that kube-rs (and kubectl)
//! use, with real-shaped JSON objects.
//!
//! * `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`,
//!   `/api/v1/pods`: a list with `metadata.resourceVersion`, in pages when asked (`limit`,
//!   `continue`, as kube-rs's watcher does with 500 a page), filtered by a
//!   `fieldSelector` of `metadata.name`, `metadata.namespace` and, for Pods,
//!   `spec.nodeName` (as the kubelet and the agent ask for one node's pods).
//! * The same with `watch=true&resourceVersion=N`: a chunked stream of newline-separated
//!   `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}` events after N, with
//!   bookmarks when asked for, or a 410 `Expired` ERROR event when N was compacted away.
//!   Under a field selector, an object that comes to match is ADDED and one that stops
//!   matching is DELETED, as the API server's watch cache does.
//!
//! Tests change objects through [`KubeApi`], and inject faults: compaction plus dropped
//! watches (so clients must relist), and failing requests (so clients must back off).
//!
//! [`KubeApi::serve_tls`] serves as a real cluster's API server does: TLS with a
//! certificate from a cluster CA, and bearer tokens checked on every request (401
//! `Unauthorized` otherwise), which a test rotates and revokes.
//!
//! Built to serve clusters of 50,000 Services and EndpointSlices (the scale benchmark):
//! every object is serialised once, when it is written, and lists and watch events copy
//! those bytes; [`KubeApi::apply_many`] loads a cluster under one lock.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
    ops::Bound,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, service::service_fn};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The resources the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
    Pods,
}

impl Resource {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlices),
            "/api/v1/nodes" => Some(Self::Nodes),
            "/api/v1/pods" => Some(Self::Pods),
            _ => None,
        }
    }

    fn kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Services => ("v1", "Service"),
            Self::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSlice"),
            Self::Nodes => ("v1", "Node"),
            Self::Pods => ("v1", "Pod"),
        }
    }

    /// The fields a `fieldSelector` may name beyond `metadata.*`: those the API server
    /// indexes for this kind (of them, what the agent uses).
    fn selectable(self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace") || (self == Self::Pods && field == "spec.nodeName")
    }
}

type Key = (Resource, String, String);

/// An object's fields that selectors read, taken when it is written.
#[derive(Debug, Clone, Default, PartialEq)]
struct Fields {
    name: String,
    namespace: String,
    node_name: Option<String>,
}

impl Fields {
    fn of(object: &Value) -> Self {
        let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
        Self {
            name: text(&object["metadata"]["name"]),
            namespace: text(&object["metadata"]["namespace"]),
            node_name: object["spec"]["nodeName"].as_str().map(str::to_owned),
        }
    }

    fn get(&self, field: &str) -> &str {
        match field {
            "metadata.name" => &self.name,
            "metadata.namespace" => &self.namespace,
            // An unscheduled pod matches `spec.nodeName=` (the scheduler's own query).
            "spec.nodeName" => self.node_name.as_deref().unwrap_or(""),
            _ => "",
        }
    }
}

/// A `fieldSelector`: `field=value` terms, all of which must hold (`==` is `=`).
#[derive(Debug, Clone)]
struct Selector {
    resource: Resource,
    terms: Vec<(String, String)>,
}

impl Selector {
    /// Parse `selector` for `resource`; what the API server refuses is refused.
    fn parse(resource: Resource, selector: Option<&str>) -> Result<Self, BadSelector> {
        let mut terms = Vec::new();
        for term in selector.unwrap_or("").split(',').filter(|t| !t.is_empty()) {
            if term.contains("!=") {
                return Err(BadSelector::Operator(term.to_owned()));
            }
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| BadSelector::Term(term.to_owned()))?;
            if !resource.selectable(field) {
                return Err(BadSelector::Field(field.to_owned()));
            }
            terms.push((field.to_owned(), value.to_owned()));
        }
        Ok(Self { resource, terms })
    }

    fn accepts(&self, resource: Resource, fields: &Fields) -> bool {
        self.resource == resource && self.terms.iter().all(|(f, v)| fields.get(f) == v)
    }

    /// Whether a watch under this selector gets anything of `change` (cheap: no copy).
    fn sees(&self, change: &Change) -> bool {
        self.accepts(change.resource, &change.fields)
            || change.before.as_ref().is_some_and(|b| self.accepts(change.resource, b))
    }

    /// What a watch under this selector gets of `change`: the event as it is, ADDED for
    /// an object that comes to match, DELETED for one that stops matching, or nothing.
    fn event(&self, change: &Change) -> Option<Bytes> {
        let now = self.accepts(change.resource, &change.fields);
        let before = change.before.as_ref().map(|b| self.accepts(change.resource, b));
        match (before, now) {
            (None | Some(true), true) => Some(change.line()),
            (Some(false), true) => Some(event_line("ADDED", &change.object)),
            (Some(true), false) => Some(event_line("DELETED", &change.object)),
            (_, false) => None,
        }
    }
}

/// A `fieldSelector` refused: Display is the 400 answer's message (the API server's words).
#[derive(Debug)]
enum BadSelector {
    /// `!=`: valid, but not needed by the agent, so not served.
    Operator(String),
    Term(String),
    Field(String),
}

impl std::fmt::Display for BadSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Operator(t) => write!(f, "the stand-in supports `=` only: {t}"),
            Self::Term(t) => write!(f, "invalid selector: '{t}'; can't understand '{t}'"),
            Self::Field(field) => write!(f, "field label not supported: {field}"),
        }
    }
}

/// An object as stored: serialised once, and its selectable fields.
#[derive(Debug, Clone)]
struct Stored {
    bytes: Bytes,
    fields: Fields,
}

/// One write, as watchers get it. The object's bytes are shared with the store, so the
/// history of a large cluster costs little more than the cluster.
#[derive(Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    /// The object's, after the write (of the deleted object for DELETED).
    fields: Fields,
    /// The object's before a MODIFIED write, so a selector it stops matching sends DELETED.
    before: Option<Fields>,
    /// ADDED, MODIFIED or DELETED.
    kind: &'static str,
    object: Bytes,
}

impl Change {
    /// The watch event line: `{"type":KIND,"object":OBJECT}\n`.
    fn line(&self) -> Bytes {
        event_line(self.kind, &self.object)
    }
}

fn event_line(kind: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + kind.len() + 24);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    line.into()
}

/// Live watchers are sent every change through a broadcast channel of this many. One that
/// falls further behind has its watch closed (as an API server closes a watch too slow for
/// its cache): the client watches again from the last version it saw and gets the rest
/// from the history, so nothing is lost. A 1,000-change rollout stays far below this; a
/// bulk load of 100,000 objects while the agent watches does not, and takes that path.
const LIVE_EVENTS: usize = 16_384;

#[derive(Default)]
struct State {
    rv: u64,
    /// Every object serialised once, when written (with its kind and resourceVersion):
    /// a list of 50,000 slices is then a copy, not 50,000 serialisations.
    objects: BTreeMap<Key, Stored>,
    /// Every change, oldest first (kept until compacted: a rollout of thousands of
    /// changes is small next to the objects themselves).
    history: Vec<Arc<Change>>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted_before: u64,
    fail_next: u32,
    requests: u64,
    /// Bearer tokens accepted (`None`: any request, the plain-HTTP stand-in).
    tokens: Option<BTreeSet<String>>,
    unauthorized: u64,
    /// Lists (not watches) served, per resource: a client that relisted shows here.
    lists: HashMap<Resource, u64>,
    /// Every kind of request seen, as RBAC names it.
    access: BTreeSet<Access>,
}

/// A request as the API server's authorizer sees it: (verb, API group, resource), for
/// example ("watch", "discovery.k8s.io", "endpointslices"). A path that names no
/// resource is (verb, "", path), as RBAC's nonResourceURLs.
pub type Access = (String, String, String);

/// RBAC's view of `method path` (watch: the query asked for a watch).
fn access(method: &hyper::Method, path: &str, watch: bool) -> Access {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => ("", &[][..]),
    };
    // namespaces/NS/RESOURCE[/NAME] is a namespaced resource; namespaces[/NAME] is not.
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let Some(resource) = rest.first() else { return (method.as_str().to_lowercase(), String::new(), path.to_owned()) };
    let named = rest.len() > 1;
    let verb = match (method.as_str(), named, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, _) => "get",
        ("GET", false, _) => "list",
        ("POST", ..) => "create",
        ("PUT", ..) => "update",
        ("PATCH", ..) => "patch",
        ("DELETE", true, _) => "delete",
        ("DELETE", false, _) => "deletecollection",
        (other, ..) => other,
    };
    (verb.to_owned(), group.to_owned(), (*resource).to_owned())
}

/// How the stand-in ends the live watches.
#[derive(Debug, Clone, Copy)]
enum Close {
    /// Close the stream: clients resume from the last version they saw.
    Drop,
    /// Send a 410 Gone `Expired` ERROR event, then close, as an API server does when the
    /// watch's version was compacted away: clients must list again. The current version.
    Expire(u64),
}

/// Handle to a running stand-in; stops with the test.
pub struct KubeApi {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Arc<Change>>,
    close_watches: broadcast::Sender<Close>,
    pub addr: SocketAddr,
    /// With TLS: the cluster CA and the service-account token files.
    pub credentials: Option<Credentials>,
    _runtime: tokio::runtime::Runtime,
}

/// A cluster's credentials as a pod sees them: the CA that signed the API server's
/// certificate, and the token file the kubelet keeps rotated.
pub struct Credentials {
    pub ca: std::path::PathBuf,
    pub token_file: std::path::PathBuf,
}

/// A new CA: its self-signed certificate and what signs with it.
fn new_ca() -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "switchyard-test cluster CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    (ca_cert, Issuer::new(ca, ca_key))
}

/// The PEM of a CA that signed nothing the stand-in serves: a wrong `certificate-authority`.
pub fn unrelated_ca_pem() -> String {
    new_ca().0.pem()
}

/// A CA and a certificate it signed for `127.0.0.1`: (CA PEM, server config).
fn cluster_tls() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let (ca_cert, issuer) = new_ca();
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    let cert = server.signed_by(&key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    (ca_cert.pem(), Arc::new(config))
}

impl KubeApi {
    /// Serve on `listener` (created by the caller in whatever network namespace the
    /// agent will reach it from).
    pub fn serve(listener: std::net::TcpListener) -> Self {
        Self::serve_with(listener, None)
    }

    /// Serve over TLS with bearer tokens, as a cluster does: the CA goes to `dir/ca.crt`,
    /// the one accepted token (`token-1`) to `dir/token`, as a pod's service account has
    /// them. [`KubeApi::kubeconfig`] then names both files.
    pub fn serve_tls(listener: std::net::TcpListener, dir: &std::path::Path) -> Self {
        let (ca_pem, config) = cluster_tls();
        let credentials = Credentials { ca: dir.join("ca.crt"), token_file: dir.join("token") };
        std::fs::write(&credentials.ca, ca_pem).unwrap();
        std::fs::write(&credentials.token_file, "token-1").unwrap();
        let mut api = Self::serve_with(listener, Some(tokio_rustls::TlsAcceptor::from(config)));
        api.state.lock().unwrap().tokens = Some(["token-1".to_owned()].into());
        api.credentials = Some(credentials);
        api
    }

    /// The kubelet's rotation: `token` is written to the token file and accepted from
    /// now on, beside the ones accepted already.
    pub fn rotate_token(&self, token: &str) {
        let creds = self.credentials.as_ref().expect("a TLS stand-in");
        std::fs::write(&creds.token_file, token).unwrap();
        self.state.lock().unwrap().tokens.get_or_insert_default().insert(token.to_owned());
    }

    /// Accept only `tokens` from now on (a revoked one gets 401).
    pub fn accept_only(&self, tokens: &[&str]) {
        self.state.lock().unwrap().tokens = Some(tokens.iter().map(|t| (*t).to_owned()).collect());
    }

    /// Requests refused for want of a valid token.
    pub fn unauthorized(&self) -> u64 {
        self.state.lock().unwrap().unauthorized
    }

    fn serve_with(listener: std::net::TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State { rv: 100, ..Default::default() }));
        let (events, _) = broadcast::channel(LIVE_EVENTS);
        let (close_watches, _) = broadcast::channel(16);
        let api = Server { state: Arc::clone(&state), events: events.clone(), close_watches: close_watches.clone() };
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let api = api.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req)) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(tls) => {
                            // A client that does not trust the CA ends its handshake here.
                            let Ok(stream) = tls.accept(stream).await else { return };
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                        None => {
                            let _ = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Self { state, events, close_watches, addr, credentials: None, _runtime: runtime }
    }

    /// A kubeconfig pointing at this server: plain HTTP with a dummy token, or with TLS
    /// the cluster CA and the token file (re-read by the client as the kubelet rotates it).
    pub fn kubeconfig(&self) -> String {
        let (server, user) = match &self.credentials {
            None => (format!("http://{}", self.addr), "token: standin-token".to_owned()),
            Some(c) => (
                format!("https://{}\n    certificate-authority: {}", self.addr, c.ca.display()),
                format!("tokenFile: {}", c.token_file.display()),
            ),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {server}\nusers:\n- name: agent\n  user:\n    {user}\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: agent\ncurrent-context: standin\n"
        )
    }

    /// Create or replace an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, resource: Resource, object: Value) {
        self.apply_many(resource, [object]);
    }

    /// [`KubeApi::apply`] for many objects under one lock (a cluster's worth at start),
    /// each its own resourceVersion and event, in order.
    pub fn apply_many(&self, resource: Resource, objects: impl IntoIterator<Item = Value>) {
        let mut s = self.state.lock().unwrap();
        for object in objects {
            let (key, rv, stored) = self.store(&mut s, resource, object);
            let (fields, object) = (stored.fields.clone(), stored.bytes.clone());
            let before = s.objects.insert(key, stored).map(|old| old.fields);
            let kind = if before.is_some() { "MODIFIED" } else { "ADDED" };
            self.record(&mut s, Change { rv, resource, fields, before, kind, object });
        }
    }

    /// `object` with its kind and the next resourceVersion, serialised: (key, version,
    /// what to store), for the caller to store.
    fn store(&self, s: &mut State, resource: Resource, mut object: Value) -> (Key, u64, Stored) {
        s.rv += 1;
        let rv = s.rv;
        let (api_version, kind) = resource.kind();
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(kind);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let stored = Stored { bytes: Bytes::from(object.to_string()), fields: Fields::of(&object) };
        (key(resource, &object), rv, stored)
    }

    /// Delete an object (DELETED to watchers).
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(stored) = s.objects.remove(&(resource, namespace.to_owned(), name.to_owned())) else { return };
        s.rv += 1;
        let rv = s.rv;
        let mut object: Value = serde_json::from_slice(&stored.bytes).expect("stored objects are JSON");
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let object = Bytes::from(object.to_string());
        self.record(&mut s, Change { rv, resource, fields: stored.fields, before: None, kind: "DELETED", object });
    }

    /// Keep `change` for watches to come and send it to those open, under the caller's
    /// lock: a watch subscribes under the same lock, so it sees each change once, either
    /// from the history or live.
    fn record(&self, s: &mut State, change: Change) {
        let change = Arc::new(change);
        s.history.push(Arc::clone(&change));
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(change);
        }
    }

    /// Forget history (as etcd compaction does) and drop every open watch: clients that
    /// resume from an old resourceVersion get 410 Gone and must list again. (One that
    /// saw the current version, from a bookmark, resumes without a 410: nothing was
    /// missed. [`KubeApi::compact_expiring_watches`] is the case that needs a relist.)
    pub fn compact_and_drop_watches(&self) {
        let mut s = self.state.lock().unwrap();
        // Resuming from the current version is fine (nothing was missed); from any older
        // one, the events in between are gone.
        s.compacted_before = s.rv;
        s.history.clear();
        let _ = self.close_watches.send(Close::Drop);
    }

    /// Write `objects` of `resource` where no watch sees them, compact the history past
    /// them, and end every live watch with a 410 Gone `Expired` ERROR event: what a
    /// client sees when its watch fell behind a compaction. Every version it has seen
    /// (bookmarks included) is now too old, so a watch from any of them gets 410 too; the
    /// only way to learn of `objects` is to list again.
    pub fn compact_expiring_watches(&self, resource: Resource, objects: impl IntoIterator<Item = Value>) {
        let mut s = self.state.lock().unwrap();
        for object in objects {
            let (key, _, stored) = self.store(&mut s, resource, object);
            s.objects.insert(key, stored);
        }
        s.compacted_before = s.rv;
        s.history.clear();
        let _ = self.close_watches.send(Close::Expire(s.rv));
    }

    /// Lists (not watches) of `resource` served so far.
    pub fn lists(&self, resource: Resource) -> u64 {
        self.state.lock().unwrap().lists.get(&resource).copied().unwrap_or(0)
    }

    /// Answer the next `n` requests with 500 Internal Server Error.
    pub fn fail_next(&self, n: u32) {
        self.state.lock().unwrap().fail_next = n;
    }

    /// Every kind of request made so far, as RBAC names it (see [`Access`]).
    pub fn access(&self) -> BTreeSet<Access> {
        self.state.lock().unwrap().access.clone()
    }

    /// Requests served so far (to see that clients came back).
    pub fn requests(&self) -> u64 {
        self.state.lock().unwrap().requests
    }
}

fn key(resource: Resource, object: &Value) -> Key {
    let m = &object["metadata"];
    (resource, m["namespace"].as_str().unwrap_or("").to_owned(), m["name"].as_str().unwrap_or("").to_owned())
}

type Body = BoxBody<Bytes, Infallible>;

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Arc<Change>>,
    close_watches: broadcast::Sender<Close>,
}

fn json_response(status: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl Server {
    fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), percent_decode(v)))
            .collect();
        {
            let mut s = self.state.lock().unwrap();
            s.requests += 1;
            let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
            s.access.insert(access(req.method(), req.uri().path(), watch));
            if let Some(tokens) = &s.tokens {
                let bearer = req.headers().get("authorization").and_then(|v| v.to_str().ok());
                if !bearer.and_then(|b| b.strip_prefix("Bearer ")).is_some_and(|t| tokens.contains(t)) {
                    s.unauthorized += 1;
                    return json_response(401, status(401, "Unauthorized", "Unauthorized"));
                }
            }
            if s.fail_next > 0 {
                s.fail_next -= 1;
                return json_response(500, status(500, "InternalError", "injected failure"));
            }
        }
        let Some(resource) = Resource::from_path(req.uri().path()) else {
            return json_response(404, status(404, "NotFound", "the server could not find the requested resource"));
        };
        let selector = match Selector::parse(resource, query.get("fieldSelector").map(String::as_str)) {
            Ok(s) => s,
            Err(bad) => return json_response(400, status(400, "BadRequest", &bad.to_string())),
        };
        if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            let timeout = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290u64).min(290);
            return self.watch(resource, from, bookmarks, Duration::from_secs(timeout), selector);
        }
        *self.state.lock().unwrap().lists.entry(resource).or_default() += 1;
        let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
        let after = match query.get("continue").filter(|c| !c.is_empty()).map(|c| Continue::parse(c)) {
            None => None,
            Some(Some(c)) => Some(c),
            Some(None) => return json_response(400, status(400, "BadRequest", "invalid continue token")),
        };
        self.list(resource, limit, after, &selector)
    }

    /// One page of a list: at most `limit` objects after `after`'s key, with a continue
    /// token when more follow. Pages after the first carry the first one's
    /// resourceVersion but show objects as they are now (there is one version of the
    /// store here, not etcd's history); the watch from that version replays whatever
    /// changed between pages, so a client still ends up with the current state.
    fn list(
        &self,
        resource: Resource,
        limit: Option<usize>,
        after: Option<Continue>,
        selector: &Selector,
    ) -> Response<Body> {
        let (items, rv, more) = {
            let s = self.state.lock().unwrap();
            let rv = after.as_ref().map_or(s.rv, |c| c.rv);
            if rv < s.compacted_before {
                return json_response(410, status(410, "Expired", "the continue token is too old; list again"));
            }
            let start = match &after {
                Some(c) => Bound::Excluded((resource, c.namespace.clone(), c.name.clone())),
                None => Bound::Included((resource, String::new(), String::new())),
            };
            let mut objects = s
                .objects
                .range((start, Bound::Unbounded))
                .take_while(|((r, _, _), _)| *r == resource)
                .filter(|((r, _, _), o)| selector.accepts(*r, &o.fields));
            // Cheap clones (shared bytes) under the lock; the copying happens after it.
            let items: Vec<(Key, Bytes)> =
                objects.by_ref().take(limit.unwrap_or(usize::MAX)).map(|(k, o)| (k.clone(), o.bytes.clone())).collect();
            let more = objects.next().is_some();
            (items, rv, more)
        };
        let (api_version, kind) = resource.kind();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if more && let Some((last, _)) = items.last() {
            metadata["continue"] = json!(Continue { rv, namespace: last.1.clone(), name: last.2.clone() }.token());
        }
        let head = format!(r#"{{"apiVersion":"{api_version}","kind":"{kind}List","metadata":{metadata},"items":["#);
        let mut body = Vec::with_capacity(head.len() + items.iter().map(|(_, o)| o.len() + 1).sum::<usize>() + 2);
        body.extend_from_slice(head.as_bytes());
        for (i, (_, object)) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(object);
        }
        body.extend_from_slice(b"]}");
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap()
    }

    fn watch(
        &self,
        resource: Resource,
        from: u64,
        bookmarks: bool,
        timeout: Duration,
        selector: Selector,
    ) -> Response<Body> {
        let line = |kind: &str, object: Value| event_line(kind, object.to_string().as_bytes());
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        // Subscribe and read history under one lock, so no event falls between them.
        let (backlog, mut live, mut close, gone, rv) = {
            let s = self.state.lock().unwrap();
            let gone = from < s.compacted_before;
            // History is in resourceVersion order: start at the first change after `from`.
            let first = s.history.partition_point(|c| c.rv <= from);
            let backlog: Vec<Arc<Change>> = s.history[first..].iter().filter(|c| selector.sees(c)).cloned().collect();
            (backlog, self.events.subscribe(), self.close_watches.subscribe(), gone, s.rv)
        };
        let (api_version, kind) = resource.kind();
        tokio::spawn(async move {
            if gone {
                let _ = tx
                    .send(line("ERROR", status(410, "Expired", &format!("too old resource version: {from} ({rv})"))))
                    .await;
                return;
            }
            for line in backlog.iter().filter_map(|c| selector.event(c)) {
                if tx.send(line).await.is_err() {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut last_rv = rv;
            loop {
                tokio::select! {
                    _ = &mut deadline => return,
                    closed = close.recv() => {
                        if let Ok(Close::Expire(now)) = closed {
                            let gone = status(410, "Expired", &format!("too old resource version: {last_rv} ({now})"));
                            let _ = tx.send(line("ERROR", gone)).await;
                        }
                        return;
                    }
                    _ = tick.tick(), if bookmarks => {
                        let bookmark = json!({"apiVersion": api_version, "kind": kind,
                                              "metadata": {"resourceVersion": last_rv.to_string()}});
                        if tx.send(line("BOOKMARK", bookmark)).await.is_err() { return; }
                    }
                    event = live.recv() => match event {
                        Ok(change) => {
                            last_rv = change.rv;
                            if let Some(line) = selector.event(&change) && tx.send(line).await.is_err() {
                                return;
                            }
                        }
                        // Lagged (see LIVE_EVENTS) or shut down: end the watch; the client
                        // resumes from the last version it got and the history fills in.
                        Err(_) => return,
                    },
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed())
            .unwrap()
    }
}

/// Where the next page of a list starts: after this object, of the list at `rv`.
struct Continue {
    rv: u64,
    namespace: String,
    name: String,
}

impl Continue {
    /// `rv/namespace/name`: names and namespaces never contain `/`.
    fn token(&self) -> String {
        format!("{}/{}/{}", self.rv, self.namespace, self.name)
    }

    fn parse(token: &str) -> Option<Self> {
        let mut parts = token.splitn(3, '/');
        let rv = parts.next()?.parse().ok()?;
        Some(Self { rv, namespace: parts.next()?.to_owned(), name: parts.next()?.to_owned() })
    }
}

fn percent_decode(v: &str) -> String {
    percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned()
}

/// Bind a listener inside the network namespace at `netns` (a /run/netns path), from a
/// short-lived thread: the socket keeps its namespace whoever uses it afterwards.
pub fn listen_in_netns(netns: &std::path::Path) -> std::net::TcpListener {
    let netns = netns.to_owned();
    thread::spawn(move || {
        let f = std::fs::File::open(&netns).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind stand-in API server")
    })
    .join()
    .expect("listener thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(object: Value, before: Option<Value>, kind: &'static str) -> Change {
        Change {
            rv: 1,
            resource: Resource::Pods,
            fields: Fields::of(&object),
            before: before.as_ref().map(Fields::of),
            kind,
            object: Bytes::from(object.to_string()),
        }
    }

    fn event_type(line: Option<Bytes>) -> Option<String> {
        line.map(|l| serde_json::from_slice::<Value>(&l).unwrap()["type"].as_str().unwrap().to_owned())
    }

    #[test]
    fn a_pod_field_selector_follows_the_node_name_as_the_watch_cache_does() {
        let on = |node: Option<&str>| json!({"metadata": {"namespace": "x", "name": "p"}, "spec": {"nodeName": node}});
        let node0 = Selector::parse(Resource::Pods, Some("spec.nodeName=node0")).unwrap();
        let kind = |c: &Change| event_type(node0.event(c));
        assert_eq!(kind(&change(on(Some("node0")), None, "ADDED")).as_deref(), Some("ADDED"));
        assert_eq!(kind(&change(on(Some("node1")), None, "ADDED")), None, "another node's pod");
        // Scheduled onto this node: it comes to match, ADDED; moved away: DELETED.
        assert_eq!(kind(&change(on(Some("node0")), Some(on(None)), "MODIFIED")).as_deref(), Some("ADDED"));
        assert_eq!(kind(&change(on(Some("node1")), Some(on(Some("node0"))), "MODIFIED")).as_deref(), Some("DELETED"));
        assert_eq!(kind(&change(on(Some("node0")), Some(on(Some("node0"))), "MODIFIED")).as_deref(), Some("MODIFIED"));
        assert!(
            Selector::parse(Resource::Pods, Some("spec.nodeName="))
                .unwrap()
                .accepts(Resource::Pods, &Fields::of(&on(None)))
        );
        assert!(!node0.accepts(Resource::Nodes, &Fields::of(&on(Some("node0")))), "another resource");
        // What the API server refuses, the stand-in refuses.
        assert!(Selector::parse(Resource::Nodes, Some("spec.nodeName=node0")).is_err());
        assert!(Selector::parse(Resource::Pods, Some("status.phase=Running")).is_err());
        let named = Selector::parse(Resource::Nodes, Some("metadata.name=node0")).unwrap();
        assert!(named.accepts(Resource::Nodes, &Fields { name: "node0".into(), ..Fields::default() }));
    }
}
