//! A stand-in for the Kubernetes API server: no real one can be installed here, so the
//! agent's Kubernetes source is tested against this instead. It is not a mock of the
//! agent's code: it speaks the real HTTP list/watch protocol that kube-rs (and kubectl)
//! use, with real-shaped JSON objects.
//!
//! * `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`
//!   (with `fieldSelector=metadata.name=...`): a list with `metadata.resourceVersion`, in
//!   pages when asked (`limit`, `continue`, as kube-rs's watcher does with 500 a page).
//! * The same with `watch=true&resourceVersion=N`: a chunked stream of newline-separated
//!   `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}` events after N, with
//!   bookmarks when asked for, or a 410 `Expired` ERROR event when N was compacted away.
//!
//! Tests change objects through [`KubeApi`], and inject faults: compaction plus dropped
//! watches (so clients must relist), and failing requests (so clients must back off).
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

/// The three resources the agent watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn from_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlices),
            "/api/v1/nodes" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Services => ("v1", "Service"),
            Self::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSlice"),
            Self::Nodes => ("v1", "Node"),
        }
    }
}

type Key = (Resource, String, String);

/// One write, as watchers get it. The object's bytes are shared with the store, so the
/// history of a large cluster costs little more than the cluster.
#[derive(Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    name: String,
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
    objects: BTreeMap<Key, Bytes>,
    /// Every change, oldest first (kept until compacted: a rollout of thousands of
    /// changes is small next to the objects themselves).
    history: Vec<Arc<Change>>,
    /// Watches from before this resourceVersion get 410 Gone.
    compacted_before: u64,
    fail_next: u32,
    requests: u64,
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

/// Handle to a running stand-in; stops with the test.
pub struct KubeApi {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Arc<Change>>,
    close_watches: broadcast::Sender<()>,
    pub addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl KubeApi {
    /// Serve on `listener` (created by the caller in whatever network namespace the
    /// agent will reach it from).
    pub fn serve(listener: std::net::TcpListener) -> Self {
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
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req)) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Self { state, events, close_watches, addr, _runtime: runtime }
    }

    /// A kubeconfig pointing at this server (plain HTTP, a dummy token).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: http://{}\nusers:\n- name: agent\n  user:\n    token: standin-token\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: agent\ncurrent-context: standin\n",
            self.addr
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
        for mut object in objects {
            s.rv += 1;
            let rv = s.rv;
            let (api_version, kind) = resource.kind();
            object["apiVersion"] = json!(api_version);
            object["kind"] = json!(kind);
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            let key = key(resource, &object);
            let bytes = Bytes::from(object.to_string());
            let name = key.2.clone();
            let event = if s.objects.insert(key, bytes.clone()).is_some() { "MODIFIED" } else { "ADDED" };
            self.record(&mut s, Change { rv, resource, name, kind: event, object: bytes });
        }
    }

    /// Delete an object (DELETED to watchers).
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(stored) = s.objects.remove(&(resource, namespace.to_owned(), name.to_owned())) else { return };
        s.rv += 1;
        let rv = s.rv;
        let mut object: Value = serde_json::from_slice(&stored).expect("stored objects are JSON");
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let object = Bytes::from(object.to_string());
        self.record(&mut s, Change { rv, resource, name: name.to_owned(), kind: "DELETED", object });
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
    /// resume from an old resourceVersion get 410 Gone and must list again.
    pub fn compact_and_drop_watches(&self) {
        let mut s = self.state.lock().unwrap();
        // Resuming from the current version is fine (nothing was missed); from any older
        // one, the events in between are gone.
        s.compacted_before = s.rv;
        s.history.clear();
        let _ = self.close_watches.send(());
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
    close_watches: broadcast::Sender<()>,
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
            if s.fail_next > 0 {
                s.fail_next -= 1;
                return json_response(500, status(500, "InternalError", "injected failure"));
            }
        }
        let Some(resource) = Resource::from_path(req.uri().path()) else {
            return json_response(404, status(404, "NotFound", "the server could not find the requested resource"));
        };
        let name_filter = query.get("fieldSelector").and_then(|f| f.strip_prefix("metadata.name=")).map(str::to_owned);
        let matches = move |r: Resource, name: &str| r == resource && name_filter.as_deref().is_none_or(|n| n == name);
        if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            let timeout = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290u64).min(290);
            return self.watch(resource, from, bookmarks, Duration::from_secs(timeout), matches);
        }
        let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
        let after = match query.get("continue").filter(|c| !c.is_empty()).map(|c| Continue::parse(c)) {
            None => None,
            Some(Some(c)) => Some(c),
            Some(None) => return json_response(400, status(400, "BadRequest", "invalid continue token")),
        };
        self.list(resource, limit, after, matches)
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
        matches: impl Fn(Resource, &str) -> bool,
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
                .filter(|((r, _, name), _)| matches(*r, name));
            // Cheap clones (shared bytes) under the lock; the copying happens after it.
            let items: Vec<(Key, Bytes)> =
                objects.by_ref().take(limit.unwrap_or(usize::MAX)).map(|(k, o)| (k.clone(), o.clone())).collect();
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
        matches: impl Fn(Resource, &str) -> bool + Send + 'static,
    ) -> Response<Body> {
        let line = |kind: &str, object: Value| event_line(kind, object.to_string().as_bytes());
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        // Subscribe and read history under one lock, so no event falls between them.
        let (backlog, mut live, mut close, gone, rv) = {
            let s = self.state.lock().unwrap();
            let gone = from < s.compacted_before;
            // History is in resourceVersion order: start at the first change after `from`.
            let first = s.history.partition_point(|c| c.rv <= from);
            let backlog: Vec<Arc<Change>> =
                s.history[first..].iter().filter(|c| matches(c.resource, &c.name)).cloned().collect();
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
            for change in backlog {
                if tx.send(change.line()).await.is_err() {
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
                    _ = close.recv() => return,
                    _ = tick.tick(), if bookmarks => {
                        let bookmark = json!({"apiVersion": api_version, "kind": kind,
                                              "metadata": {"resourceVersion": last_rv.to_string()}});
                        if tx.send(line("BOOKMARK", bookmark)).await.is_err() { return; }
                    }
                    event = live.recv() => match event {
                        Ok(change) => {
                            last_rv = change.rv;
                            if matches(change.resource, &change.name) && tx.send(change.line()).await.is_err() {
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
