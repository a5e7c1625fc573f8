//! The agent's own resources: how many connections it holds at most, what happens at
//! that limit, and which errors are its own shortage rather than an endpoint's failure.
//!
//! Every proxied connection costs the agent two descriptors. Past a limit derived from
//! the open-files limit (`agent.max_connections` overrides it) the agent is *saturated*:
//! it takes its listeners out of `SY_LISTENERS`, so the connect programs send new
//! connections straight to a healthy endpoint in the kernel, as they do while no agent
//! runs. Once enough connections have closed it puts them back. A connection is never
//! left waiting in a listen backlog the agent cannot serve, and the agent never runs out
//! of descriptors for the connections it already has.
//!
//! Should it run out anyway (another limit, the node's file table, ephemeral ports), the
//! error is counted and logged as the agent's condition ([`Shortage`]) and never feeds an
//! endpoint's failure accrual or health: a healthy endpoint stays in service.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tracing::warn;

use crate::stats::Metrics;

/// An error that says the agent itself is short of something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortage {
    /// EMFILE: the process's open-files limit.
    Emfile = 0,
    /// ENFILE: the node's file table.
    Enfile = 1,
    /// ENOBUFS: socket buffers.
    Enobufs = 2,
    /// ENOMEM.
    Enomem = 3,
    /// EADDRNOTAVAIL on connect: the ephemeral ports are used up.
    Eaddrnotavail = 4,
}

impl Shortage {
    /// The shortage `error` reports, if it is one.
    pub fn of(error: &io::Error) -> Option<Self> {
        match error.raw_os_error()? {
            libc::EMFILE => Some(Self::Emfile),
            libc::ENFILE => Some(Self::Enfile),
            libc::ENOBUFS => Some(Self::Enobufs),
            libc::ENOMEM => Some(Self::Enomem),
            libc::EADDRNOTAVAIL => Some(Self::Eaddrnotavail),
            _ => None,
        }
    }

    /// The `error` label of `switchyard_local_errors`.
    pub fn name(self) -> &'static str {
        ["emfile", "enfile", "enobufs", "enomem", "eaddrnotavail"][self as usize]
    }

    fn meaning(self) -> &'static str {
        [
            "the agent's open-files limit is reached (raise LimitNOFILE / the container's nofile ulimit, or lower agent.max_connections)",
            "the node's file table is full (fs.file-max)",
            "the kernel is out of socket buffers",
            "the kernel is out of memory",
            "no ephemeral port is free for a new upstream connection (net.ipv4.ip_local_port_range)",
        ][self as usize]
    }
}

/// Count a shortage met while doing `op` (`connect`, `accept`, `health_check`) and log
/// it, at most once a second per kind: under a flood this happens thousands of times.
pub fn shortage(metrics: &Metrics, op: &'static str, what: Shortage) {
    metrics.local_error(op, what.name()).inc();
    static LOGGED: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if LOGGED[what as usize].swap(now, Relaxed) != now {
        warn!(
            op,
            error = what.name(),
            "the agent is short of resources: {}; not counted against any endpoint",
            what.meaning()
        );
    }
}

/// How many connections the agent holds at most, and how many it holds now.
pub struct Capacity {
    limit: usize,
    /// Saturation ends once this few are open (a tenth below the limit, so a limit
    /// that is hovered at does not flap the listeners in and out).
    resume_at: usize,
    open: AtomicUsize,
    saturated: AtomicBool,
    /// `true` while saturated: the app takes the listeners out of the kernel's map (and
    /// logs the change once it is made).
    publish: watch::Sender<bool>,
    saturations: Counter,
}

/// Descriptors kept free beyond two per connection: for pooled HTTP connections, health
/// checks, DNS, the admin API, and connections still in the backlog when saturation
/// begins. An eighth of the limit, within [64, 1024].
fn headroom(nofile: u64) -> u64 {
    (nofile / 8).clamp(64, 1024)
}

/// The connection limit the open-files limit `nofile` allows when `in_use` descriptors
/// are taken already: two per connection, after the headroom.
pub fn derived_limit(nofile: u64, in_use: u64) -> usize {
    (nofile.saturating_sub(in_use + headroom(nofile)) / 2).max(1) as usize
}

/// The soft open-files limit and the descriptors this process has open now.
pub fn descriptors() -> io::Result<(u64, u64)> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let open = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok((soft, open))
}

impl Capacity {
    pub fn new(limit: usize, metrics: &Metrics) -> (Arc<Self>, watch::Receiver<bool>) {
        let limit = limit.max(1);
        metrics.max_connections.set(limit as i64);
        let (publish, saturated) = watch::channel(false);
        let capacity = Self {
            limit,
            resume_at: limit - limit.div_ceil(10),
            open: AtomicUsize::new(0),
            saturated: AtomicBool::new(false),
            publish,
            saturations: metrics.saturations.clone(),
        };
        (Arc::new(capacity), saturated)
    }

    /// The limit in force: `configured`, else what the descriptors allow (read now: call
    /// it once the agent holds everything it holds at rest).
    pub fn limit_for(configured: Option<usize>) -> usize {
        let derived = match descriptors() {
            Ok((nofile, in_use)) => Some((derived_limit(nofile, in_use), nofile)),
            Err(e) => {
                warn!(error = %e, "cannot read the open-files limit; agent.max_connections defaults to 1024");
                None
            }
        };
        match (configured, derived) {
            (Some(n), Some((fits, nofile))) if n > fits => {
                warn!(
                    max_connections = n,
                    open_files_limit = nofile,
                    fits,
                    "agent.max_connections is more than the open-files limit allows: connections past {fits} may fail for want of descriptors"
                );
                n
            }
            (Some(n), _) => n,
            (None, Some((fits, _))) => fits,
            (None, None) => 1024,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Where saturation ends.
    pub fn resume_at(&self) -> usize {
        self.resume_at
    }

    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    pub fn saturated(&self) -> bool {
        self.saturated.load(Relaxed)
    }

    /// Times the agent became saturated since it started.
    pub fn saturations(&self) -> u64 {
        self.saturations.get()
    }

    /// Bring the metrics that read the counts up to date (before a scrape).
    pub fn export(&self, metrics: &Metrics) {
        metrics.agent_connections.set(self.open() as i64);
        metrics.saturated.set(i64::from(self.saturated()));
    }

    /// What `/status` says of it.
    pub fn view(&self) -> CapacityView {
        CapacityView {
            max_connections: self.limit,
            open: self.open(),
            saturated: self.saturated(),
            saturations: self.saturations(),
        }
    }

    /// Count an accepted connection until the permit drops. Accepted connections are
    /// always served: the limit is where the agent stops taking *new* ones.
    pub fn admit(self: &Arc<Self>) -> Permit {
        let open = self.open.fetch_add(1, Relaxed) + 1;
        if open >= self.limit && !self.saturated.swap(true, Relaxed) {
            self.saturations.inc();
            self.publish.send_replace(true);
        }
        Permit(Arc::clone(self))
    }

    fn release(&self) {
        let open = self.open.fetch_sub(1, Relaxed) - 1;
        if open <= self.resume_at && self.saturated.load(Relaxed) && self.saturated.swap(false, Relaxed) {
            self.publish.send_replace(false);
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CapacityView {
    pub max_connections: usize,
    /// Connections the agent holds now.
    pub open: usize,
    /// At the limit: new connections go straight to endpoints in the kernel.
    pub saturated: bool,
    pub saturations: u64,
}

/// One connection counted against the [`Capacity`].
pub struct Permit(Arc<Capacity>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_leaves_two_descriptors_per_connection_after_the_headroom() {
        // 20,000 open files, 60 in use: 1,024 headroom.
        assert_eq!(derived_limit(20_000, 60), (20_000 - 60 - 1024) / 2);
        // 1,024: an eighth, 128.
        assert_eq!(derived_limit(1024, 40), (1024 - 40 - 128) / 2);
        // Tiny limits keep 64 and never go below one connection.
        assert_eq!(derived_limit(256, 50), (256 - 50 - 64) / 2);
        assert_eq!(derived_limit(64, 60), 1);
    }

    #[test]
    fn saturation_begins_at_the_limit_and_ends_a_tenth_below() {
        let (cap, mut saturated) = Capacity::new(20, &Metrics::default());
        let mut permits: Vec<Permit> = (0..19).map(|_| cap.admit()).collect();
        assert!(!cap.saturated() && !*saturated.borrow_and_update());
        permits.push(cap.admit());
        assert!(cap.saturated());
        assert!(saturated.has_changed().unwrap() && *saturated.borrow_and_update());
        // Served beyond the limit: no new transition.
        permits.push(cap.admit());
        assert_eq!((cap.open(), cap.saturations()), (21, 1));
        // 21 open: still saturated until 18 (20 - 2).
        permits.truncate(19);
        assert!(cap.saturated());
        permits.truncate(18);
        assert!(!cap.saturated());
        assert!(!*saturated.borrow_and_update());
        permits.extend((0..2).map(|_| cap.admit()));
        assert_eq!((cap.saturated(), cap.saturations()), (true, 2));
    }

    #[test]
    fn shortages_are_told_from_endpoint_failures() {
        for (errno, want) in [
            (libc::EMFILE, Some(Shortage::Emfile)),
            (libc::ENFILE, Some(Shortage::Enfile)),
            (libc::ENOBUFS, Some(Shortage::Enobufs)),
            (libc::ENOMEM, Some(Shortage::Enomem)),
            (libc::EADDRNOTAVAIL, Some(Shortage::Eaddrnotavail)),
            (libc::ECONNREFUSED, None),
            (libc::ETIMEDOUT, None),
            (libc::EHOSTUNREACH, None),
        ] {
            assert_eq!(Shortage::of(&io::Error::from_raw_os_error(errno)), want, "errno {errno}");
        }
        assert_eq!(Shortage::of(&io::Error::other("no errno")), None);
    }
}
