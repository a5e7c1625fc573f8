//! Switchyard: a transparent node agent for service-to-service traffic.
//!
//! # Layout
//!
//! * [`config`]: the YAML config file: serde types, defaults, validation that names the
//!   bad field.
//! * [`redirect`]: the kernel side seen from userspace (the only user of aya): host checks,
//!   loading and attaching the eBPF programs, pinning them and their maps in bpffs (and
//!   `uninstall`), the maps the agent writes (services, fallback endpoints, listeners, pod
//!   namespace states, exclusions) and counters.
//! * [`origin`]: where a redirected connection was going and who opened it: the seam
//!   between the kernel (`redirect::OrigDstTable`) and the proxy (a fixed table in the
//!   in-process tests).
//! * [`state`]: immutable snapshots of the services, their endpoints and policy, indexed
//!   by service address; routes compiled at build time and one walker over them
//!   (`state::route`: the plan of a connection, each request's concrete services, the
//!   kernel fallback's sets); unchanged services shared between snapshots, live endpoint
//!   state carried across reloads.
//! * [`balance`]: endpoint choice: health and ejection, locality tiers, the balancing
//!   policies, session affinity. Pure, clocked by the caller.
//! * [`proxy`]: listeners, the accept loop, protocol detection, opaque TCP (per-connection
//!   counted byte copying) and HTTP (hyper's server, per-request balancing over pooled
//!   upstream connections: HTTP/1.1 by our own client `proxy::http::h1`, HTTP/2 by
//!   hyper's; retries under a budget, upgrades as tunnels on the same copy);
//!   `proxy::attempt` is the one attempt engine (tried set, deadline, pick, feedback)
//!   under both, `proxy::upstream` connects over it, `proxy::outcome` is how a connection
//!   ended.
//! * [`health`]: active health checks (TCP connect or HTTP GET).
//! * [`nodeaddr`]: the node addresses on the host's `lo` where pods reach the agent
//!   (rtnetlink; added at start, removed at uninstall).
//! * [`pods`]: which pod network namespaces cannot reach the agent (blocked paths, probed
//!   again with back-off); pure, fed from the kernel maps by `reconcile`.
//! * [`handover`]: upgrade hand-over: giving the listening sockets to a newer agent over
//!   a unix socket, and taking them from the running one.
//! * [`discovery`]: sources beyond the config file: the watched catalog file, DNS names
//!   and the Kubernetes API, each sending updates that `reconcile` merges, validates and
//!   applies.
//! * [`reconcile`]: after start-up, every change: apply or reject (typed errors, last good
//!   state kept), kernel maps in step with endpoint health and pods, the HTTP pool swept;
//!   owns the background tasks.
//! * [`tasks`]: one tracker and stop signal for every background task.
//! * [`stats`]: the live connection table, Prometheus metrics, golden signals per route
//!   and endpoint (`/stat`, `/edges`), the live tap.
//! * [`workload`]: who a client is, as the operator knows it: cgroup id -> path (by
//!   handle, else a bounded walk), the kubelet's and systemd's path layouts, and the
//!   node's pods (fed by the Kubernetes source) naming the owning workload.
//! * [`resolve`]: a service's resolution tree (routes down to endpoint health).
//! * [`admin`]: the localhost admin HTTP API (connections, services, metrics, config,
//!   status, resolve, log level, the dashboard), on a thread of its own, and the CLI's
//!   client for it.
//! * [`cli`]: `switchyard conns`, `services`, `top`: tables over the admin API.
//! * [`app`]: the composition root: `build` binds and wires the above in start-up order and
//!   returns what it bound; `Bound::wait` runs to shutdown. `Kernel::None` builds it
//!   without the kernel side (no root), for the in-process tests.
//! * `fuzzing` (hidden): the pure functions the fuzz targets in `fuzz/` drive that their
//!   modules keep to the crate (docs/fuzzing.md).
//!
//! The path of one connection: an application in the attached cgroup calls `connect()` to
//! a service address; `cgroup/connect4|6` rewrites it to the agent's loopback listener (or,
//! from a pod's network namespace, to the node address) and records the original
//! destination; `proxy` accepts, asks its `origin` source for the original destination by
//! the client's address, the snapshot's plan names the service and what to try (decide),
//! the attempt engine has `balance` pick an endpoint and `proxy` connects with the agent's
//! SO_MARK (which the kernel programs never redirect) and copies bytes, counting them into
//! `stats` as they move (act); the task's outcome is recorded in one place. See
//! docs/design.md, docs/balancing.md, docs/discovery.md and, for start, agent death,
//! upgrade and removal, docs/lifecycle.md.

pub mod admin;
pub mod app;
pub mod balance;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod direct;
pub mod discovery;
pub mod handover;
pub mod health;
pub mod memory;
pub mod nodeaddr;
pub mod origin;
pub mod pods;
pub mod proxy;
pub mod reconcile;
pub mod redirect;
pub mod resolve;
pub mod state;
pub mod stats;
pub mod tasks;
pub mod workload;

/// What the fuzz targets (`fuzz/`, docs/fuzzing.md) call that the modules keep to the
/// crate: pure functions over bytes a client or a file controls. Re-exports only, so the
/// modules keep their narrow visibility; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::{
        proxy::{
            detect::{Detected, MAX_PREFIX, classify, decide},
            http::{
                h1::{Decoded, decode_response},
                headers::{DTAB, dtab_target, is_upgrade, retryable, strip_hop_by_hop},
            },
        },
        redirect::table::encode as backends_table,
    };
}
