//! A stand-in for the Kubernetes API server: no real one can be installed here, so the
//! agent's Kubernetes source is tested against this instead. It is not a mock of the
//! agent's code: it speaks the real HTTP list/watch protocol that kube-rs (and kubectl)
//! use, with real-shaped JSON objects.
//!
//! * `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`
//!   (with `fieldSelector=metadata.name=...`): a list with `metadata.resourceVersion`.
//! * The same with `watch=true&resourceVersion=N`: a chunked stream of newline-separated
//!   `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}` events after N, with
//!   bookmarks when asked for, or a 410 `Expired` ERROR event when N was compacted away.
//!
//! Tests change objects through [`KubeApi`], and inject faults: compaction plus dropped
//! watches (so clients must relist), and failing requests (so clients must back off).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    net::SocketAddr,
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

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, resource, event type, object), oldest first.
    history: Vec<(u64, Resource, &'static str, Value)>,
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
    events: broadcast::Sender<(u64, Resource, &'static str, Value)>,
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
        let (events, _) = broadcast::channel(1024);
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
    pub fn apply(&self, resource: Resource, mut object: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let (api_version, kind) = resource.kind();
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(kind);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key(resource, &object);
        let event = if s.objects.insert(key, object.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        s.history.push((rv, resource, event, object.clone()));
        let _ = self.events.send((rv, resource, event, object));
    }

    /// Delete an object (DELETED to watchers).
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(mut object) = s.objects.remove(&(resource, namespace.to_owned(), name.to_owned())) else { return };
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.history.push((rv, resource, "DELETED", object.clone()));
        let _ = self.events.send((rv, resource, "DELETED", object));
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
    events: broadcast::Sender<(u64, Resource, &'static str, Value)>,
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
        let matches = move |r: Resource, o: &Value| {
            r == resource && name_filter.as_deref().is_none_or(|n| o["metadata"]["name"].as_str() == Some(n))
        };
        if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
            let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            let timeout = query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290u64).min(290);
            return self.watch(resource, from, bookmarks, Duration::from_secs(timeout), matches);
        }
        let s = self.state.lock().unwrap();
        let items: Vec<Value> =
            s.objects.iter().filter(|((r, _, _), o)| matches(*r, o)).map(|(_, o)| o.clone()).collect();
        let (api_version, kind) = resource.kind();
        json_response(
            200,
            json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                   "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
        )
    }

    fn watch(
        &self,
        resource: Resource,
        from: u64,
        bookmarks: bool,
        timeout: Duration,
        matches: impl Fn(Resource, &Value) -> bool + Send + 'static,
    ) -> Response<Body> {
        let line = |kind: &str, object: Value| Bytes::from(format!("{}\n", json!({"type": kind, "object": object})));
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        // Subscribe and read history under one lock, so no event falls between them.
        let (backlog, mut live, mut close, gone, rv) = {
            let s = self.state.lock().unwrap();
            let gone = from < s.compacted_before;
            let backlog: Vec<Bytes> = s
                .history
                .iter()
                .filter(|(rv, r, _, o)| *rv > from && matches(*r, o))
                .map(|(_, _, t, o)| line(t, o.clone()))
                .collect();
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
            for b in backlog {
                if tx.send(b).await.is_err() {
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
                        Ok((rv, r, t, o)) => {
                            last_rv = rv;
                            if matches(r, &o) && tx.send(line(t, o)).await.is_err() { return; }
                        }
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
