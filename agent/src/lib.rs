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
//! * [`state`]: immutable snapshots of the services, their endpoints and policy, indexed
//!   by service address; carries live endpoint state across reloads.
//! * [`balance`]: endpoint choice: health and ejection, locality tiers, the balancing
//!   policies. Pure, clocked by the caller.
//! * [`proxy`]: listeners, the accept loop, protocol detection, opaque TCP (per-connection
//!   byte copying) and HTTP (hyper, per-request balancing over pooled upstream
//!   connections, retries under a budget); `proxy::upstream` connects to an endpoint with
//!   retries on others.
//! * [`health`]: active health checks (TCP connect or HTTP GET).
//! * [`nodeaddr`]: the node addresses on the host's `lo` where pods reach the agent
//!   (rtnetlink; added at start, removed at uninstall).
//! * [`pods`]: which pod network namespaces cannot reach the agent (blocked paths, probed
//!   again with back-off); pure, fed from the kernel maps by `app`.
//! * [`handover`]: upgrade hand-over: giving the listening sockets to a newer agent over
//!   a unix socket, and taking them from the running one.
//! * [`discovery`]: sources beyond the config file: the watched catalog file, DNS names
//!   and the Kubernetes API, each sending updates that `app` merges, validates and applies.
//! * [`stats`]: the live connection table, Prometheus metrics, cgroup paths.
//! * [`resolve`]: a service's resolution tree (routes down to endpoint health).
//! * [`admin`]: the localhost admin HTTP API (connections, services, metrics, config,
//!   status, resolve, log level, the dashboard) and the CLI's client for it.
//! * [`cli`]: `switchyard conns`, `services`, `top`: tables over the admin API.
//! * [`app`]: the composition root: wires the above together and owns start-up order and
//!   shutdown.
//!
//! The path of one connection: an application in the attached cgroup calls `connect()` to
//! a service address; `cgroup/connect4|6` rewrites it to the agent's loopback listener (or,
//! from a pod's network namespace, to the node address) and records the original
//! destination; `proxy` accepts, asks `redirect` for the original
//! destination by the client's address, `state` names the service, `balance` picks an
//! endpoint, and `proxy` connects with the agent's SO_MARK (which the kernel programs
//! never redirect) and copies bytes, counting them into `stats` as they move. See
//! docs/design.md, docs/balancing.md, docs/discovery.md and, for start, agent death,
//! upgrade and removal, docs/lifecycle.md.

pub mod admin;
pub mod app;
pub mod balance;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod handover;
pub mod health;
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
