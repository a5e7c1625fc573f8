//! The kernel side, seen from the agent: load the embedded eBPF object, fill its maps,
//! attach its programs to a cgroup, and read what they record. The only user of aya.
//!
//! Lifetime: the maps and the cgroup links are pinned in the agent's bpffs directory
//! (`pins`), so they outlive the process on purpose. A killed agent leaves the programs
//! attached, and they serve connects from the kernel (fallback) until the next agent
//! starts; that agent loads against the same pinned maps and swaps its programs into the
//! pinned links in place (`link::update`). Dropping [`Redirect`] therefore detaches
//! nothing: only [`uninstall`] (the `uninstall` command, or a stop with no successor)
//! removes the programs and the pins. See docs/lifecycle.md.

mod events;
mod host;
mod link;
mod pins;
mod pods;
pub(crate) mod table;

use std::{
    collections::HashSet,
    fs::File,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockMap},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, LinkError},
    },
};
pub use events::Events;
pub use host::{HostError, attach_cgroup, cgroup2_root, check_privileges};
pub use pins::cgroup_id;
pub use pins::{PinDir, PinError, Removed, uninstall};
pub use pods::{PodMaps, monotonic_ns};
use switchyard_common::{
    AgentV2, BackendsV2, NetnsV1, OrigDstV3, ServiceV2, SockAddrV1, counter, map, netns, prog, service,
};
use tracing::{info, warn};

use crate::{
    balance::Weighted,
    origin::{Origin, Origins},
};

/// The compiled programs, built by build.rs from `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switchyard-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "load the eBPF object into the kernel (with its maps pinned in {}; if they were \
         pinned by an incompatible switchyard, `switchyard uninstall` removes them)",
        pins.display()
    )]
    Load {
        pins: PathBuf,
        // Boxed: the loader's error is large, and every Result of this module carries it.
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the embedded eBPF object has no {kind} named {name}; agent and ebpf/ were built from different sources")]
    Missing { kind: &'static str, name: &'static str },
    #[error("load program {name} (the verifier log, if any, is below)")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("open cgroup directory {}", path.display())]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attach {name} to cgroup {}", cgroup.display())]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("access BPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("open a second handle on BPF map {name}")]
    Dup {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("watch BPF map {name} for new records")]
    Watch {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("remove the pins of an older switchyard")]
    Stale(#[source] PinError),
    #[error("pin or reuse the link of {name} at {}", path.display())]
    Link {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: LinkPinError,
    },
}

/// Why a pinned link could not be created, opened or updated.
#[derive(Debug, thiserror::Error)]
pub enum LinkPinError {
    #[error("open the pinned link")]
    Open(#[source] std::io::Error),
    #[error("the program was attached without a bpf_link (kernel older than 5.7?)")]
    NotFdLink(#[source] LinkError),
    #[error("pin the link")]
    Pin(#[source] aya::pin::PinError),
    #[error("swap the new program into the pinned link")]
    Update(#[source] std::io::Error),
    #[error("detach the link left on the previous cgroup")]
    Detach(#[source] std::io::Error),
    #[error("remove the link pin left on the previous cgroup")]
    Remove(#[source] std::io::Error),
}

/// Loaded and attached programs plus the maps the agent writes. Everything stays attached
/// and pinned when it is dropped; see [`uninstall`].
pub struct Redirect {
    services: HashMap<MapData, SockAddrV1, ServiceV2>,
    backends: HashMap<MapData, SockAddrV1, BackendsV2>,
    /// A hash of each table `backends` holds, so a sync writes only the entries that
    /// changed (a hash, not the 2 KiB value: thousands of services are common).
    backends_written: std::collections::HashMap<SockAddrV1, u64>,
    /// What `services` holds, so a sync writes only what changed.
    services_written: std::collections::HashMap<SockAddrV1, ServiceV2>,
    /// This node's name (its hostname): which subset a table of a service with more
    /// endpoints than a table holds keeps.
    node: String,
    events: Option<aya::maps::RingBuf<MapData>>,
    host_netns: u64,
    counters: Arc<KernelCounters>,
    sock_orig: HashMap<MapData, u64, OrigDstV3>,
    /// Written at start; the kernel drops an entry by itself when its socket's last fd
    /// closes, which is what the programs' liveness check relies on. A saturated agent
    /// takes its entries out for a while (`step_aside`).
    listeners: SockMap<MapData>,
    pods: PodMaps,
    // Last: dropping it detaches the programs, after everything above is done with.
    ebpf: Ebpf,
}

/// The proxy's side of `SY_CLIENT_ORIG` and `SY_NETNS`, shared by its connection tasks.
pub struct OrigDstTable {
    inner: Mutex<OrigInner>,
    /// The agent's own network namespace: connections from any other come from pods.
    host_netns: u64,
}

struct OrigInner {
    client_orig: HashMap<MapData, SockAddrV1, OrigDstV3>,
    netns: HashMap<MapData, u64, NetnsV1>,
    /// Pod namespaces already marked reachable by this agent, so the map is written once
    /// per namespace and not once per connection.
    confirmed: HashSet<u64>,
}

impl Origins for OrigDstTable {
    /// The original destination and client of a connection the agent accepted, by its
    /// peer address. The entry is taken (an entry left behind means a SYN that never
    /// arrived, see `PodMaps::stuck_namespaces`), and a pod namespace that reached us is
    /// marked reachable, which ends its probe.
    fn lookup(&self, client: SocketAddr) -> Option<Origin> {
        let key = SockAddrV1::from(client);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Taken in one system call (read and delete): nothing else removes it. A kernel
        // older than 5.14 refuses the call for hash maps: then two.
        let o = match take(aya::maps::IterableMap::map(&inner.client_orig), &key) {
            Ok(o) => o?,
            Err(_) => {
                let o = inner.client_orig.get(&key, 0).ok()?;
                let _ = inner.client_orig.remove(&key);
                o
            }
        };
        let pod = o.netns_cookie != self.host_netns;
        if pod && !inner.confirmed.contains(&o.netns_cookie) {
            let reachable = NetnsV1 { state: netns::REACHABLE, _pad: 0, since_ns: pods::monotonic_ns() };
            match inner.netns.insert(o.netns_cookie, reachable, 0) {
                Ok(()) => {
                    inner.confirmed.insert(o.netns_cookie);
                    tracing::debug!(netns = o.netns_cookie, "pod network namespace reaches the agent");
                }
                Err(e) => {
                    tracing::warn!(error = %e, netns = o.netns_cookie, "could not mark a pod namespace reachable")
                }
            }
        }
        Some(Origin::recorded(&o, o.dst.to_socket_addr(), pod))
    }
}

impl OrigDstTable {
    /// A namespace the reconciler marked blocked or forgot must be confirmed again.
    pub fn forget(&self, netns: u64) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).confirmed.remove(&netns);
    }
}

impl Redirect {
    /// Load the programs against the maps pinned in `pins` (created there on first use),
    /// publish `agent`, the service addresses and their endpoint tables, then attach to
    /// `cgroup`, or swap the new programs into the links a previous agent pinned. The
    /// caller must have bound the listeners named in `agent` already; the programs check
    /// that a listener exists before they redirect to it in any case.
    ///
    /// A first install (nothing pinned yet) that fails halfway, say a program the
    /// verifier refuses, removes what it pinned; over a previous install, that install's
    /// pins stay and keep serving (the in-kernel fallback) until an agent starts.
    pub fn start(
        cgroup: &Path,
        pins: &PinDir,
        agent: AgentV2,
        listeners: &[(u32, BorrowedFd<'_>)],
        services: impl IntoIterator<Item = ServiceAddr>,
        backends: &[(SocketAddr, Vec<Weighted>)],
    ) -> Result<(Self, Arc<OrigDstTable>), RedirectError> {
        let first_install = pins.is_empty();
        let started = Self::start_pinned(cgroup, pins, agent, listeners, services, backends);
        if started.is_err()
            && first_install
            && let Err(e) = uninstall(pins.path())
        {
            warn!(error = %e, "could not remove what the failed start pinned");
        }
        started
    }

    fn start_pinned(
        cgroup: &Path,
        pins: &PinDir,
        agent: AgentV2,
        listeners: &[(u32, BorrowedFd<'_>)],
        services: impl IntoIterator<Item = ServiceAddr>,
        backends: &[(SocketAddr, Vec<Weighted>)],
    ) -> Result<(Self, Arc<OrigDstTable>), RedirectError> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.path())
            .load(OBJECT)
            .map_err(|source| RedirectError::Load { pins: pins.path().to_owned(), source: Box::new(source) })?;

        let services_map: HashMap<_, SockAddrV1, ServiceV2> = typed_map(&mut ebpf, map::SERVICES)?;
        let backends_map: HashMap<_, SockAddrV1, BackendsV2> = typed_map(&mut ebpf, map::BACKENDS)?;
        let events = Some(typed_map(&mut ebpf, map::EVENTS)?);
        let mut agent_map: Array<_, AgentV2> = typed_map(&mut ebpf, map::AGENT)?;
        agent_map.set(0, agent, 0).map_err(|source| RedirectError::Map { name: map::AGENT, source })?;
        // Listeners first: a connect is only ever sent to a listener found here.
        let mut listeners_map: SockMap<MapData> = typed_map(&mut ebpf, map::LISTENERS)?;
        for (slot, fd) in listeners {
            listeners_map.set(*slot, fd, 0).map_err(|source| RedirectError::Map { name: map::LISTENERS, source })?;
        }
        let client_orig: HashMap<MapData, SockAddrV1, OrigDstV3> = typed_map(&mut ebpf, map::CLIENT_ORIG)?;
        let netns_map: HashMap<MapData, u64, NetnsV1> = typed_map(&mut ebpf, map::NETNS)?;
        let orig = Arc::new(OrigDstTable {
            inner: Mutex::new(OrigInner {
                client_orig: second_handle(&client_orig, map::CLIENT_ORIG)?,
                netns: second_handle(&netns_map, map::NETNS)?,
                confirmed: HashSet::new(),
            }),
            host_netns: agent.netns_cookie,
        });
        let pods = PodMaps::new(agent, agent_map, netns_map, typed_map(&mut ebpf, map::EXCLUDE)?, client_orig)?;
        let counters = Arc::new(KernelCounters(typed_map(&mut ebpf, map::COUNTERS)?));
        let sock_orig = typed_map(&mut ebpf, map::SOCK_ORIG)?;
        // A reused map may hold entries of the previous agent: start from what is there.
        let backends_written = backends_map.iter().filter_map(Result::ok).map(|(k, v)| (k, digest(&v))).collect();
        let services_written = services_map.iter().filter_map(Result::ok).collect();
        let mut redirect = Self {
            services: services_map,
            backends: backends_map,
            backends_written,
            services_written,
            node: nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default(),
            events,
            host_netns: agent.netns_cookie,
            counters,
            sock_orig,
            listeners: listeners_map,
            pods,
            ebpf,
        };
        redirect.sync_backends(backends)?;
        redirect.sync_services(services)?;

        let cgroup_dir =
            File::open(cgroup).map_err(|source| RedirectError::OpenCgroup { path: cgroup.to_owned(), source })?;
        let cgroup_id =
            pins::cgroup_id(cgroup).map_err(|source| RedirectError::OpenCgroup { path: cgroup.to_owned(), source })?;
        // sock_ops and getpeername first, connect last: by the time a connect can be
        // redirected, everything that follows it through is in place.
        let mut replaced = 0;
        for name in prog::ALL {
            replaced += attach(&mut redirect.ebpf, name, &cgroup_dir, cgroup, cgroup_id, pins)? as usize;
        }
        let stale = pins.remove_stale().map_err(RedirectError::Stale)?;
        info!(
            cgroup = %cgroup.display(),
            pins = %pins.path().display(),
            attached = prog::ALL.len() - replaced,
            replaced_in_place = replaced,
            stale_links_removed = stale.links,
            stale_maps_removed = stale.maps,
            "redirect programs in place"
        );
        Ok((redirect, orig))
    }

    /// Make the kernel's service addresses exactly `services`: add the new, delete the gone.
    /// Entries that stay are never deleted, so connects to them are redirected throughout
    /// (a change of mode rewrites the entry in place).
    pub fn sync_services(&mut self, services: impl IntoIterator<Item = ServiceAddr>) -> Result<(), RedirectError> {
        let want: std::collections::HashMap<SockAddrV1, ServiceV2> =
            services.into_iter().map(|s| (SockAddrV1::from(s.addr), service_entry(&s))).collect();
        let gone: Vec<SockAddrV1> = self.services_written.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for key in gone {
            self.write_service(key, None)?;
        }
        for (key, value) in want {
            self.write_service(key, Some(value))?;
        }
        Ok(())
    }

    /// Make the kernel's endpoint tables exactly `backends` (service address -> its
    /// endpoints' shares), writing only the entries that changed. Each entry is replaced
    /// whole, so the kernel never reads a half-written table.
    pub fn sync_backends(&mut self, backends: &[(SocketAddr, Vec<Weighted>)]) -> Result<(), RedirectError> {
        let want: std::collections::HashMap<SockAddrV1, &[Weighted]> =
            backends.iter().map(|(svc, eps)| (SockAddrV1::from(*svc), eps.as_slice())).collect();
        let gone: Vec<SockAddrV1> = self.backends_written.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for key in gone {
            self.write_table(key, None)?;
        }
        let mut changed = 0;
        for (key, eps) in want {
            changed += usize::from(self.write_table(key, Some(eps))?);
        }
        if changed > 0 {
            tracing::debug!(changed, "kernel endpoint tables updated");
        }
        Ok(())
    }

    /// Take the agent's `listeners` out of `SY_LISTENERS` (`aside`), so that the connect
    /// programs send new connections straight to endpoints in the kernel, as while no
    /// agent runs; or put them back. What a saturated agent does (see `capacity`).
    pub fn step_aside(&mut self, aside: bool, listeners: &[(u32, BorrowedFd<'_>)]) -> Result<(), RedirectError> {
        let name = map::LISTENERS;
        for (slot, fd) in listeners {
            let done = if aside { self.listeners.clear_index(slot) } else { self.listeners.set(*slot, fd, 0) };
            match done {
                // Already out: the slot was never filled (no such listener) or is gone.
                Err(MapError::SyscallError(e)) if aside && e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                r => r.map_err(|source| RedirectError::Map { name, source })?,
            }
        }
        Ok(())
    }

    /// Bring the entries of just these service addresses up to date: what a change to a
    /// few services needs, instead of a pass over every address. A table is written before
    /// the service entry that sends connects to it, and outlives it when both go.
    pub fn update_addresses(&mut self, entries: &[KernelEntry]) -> Result<(), RedirectError> {
        let mut changed = 0;
        for e in entries {
            let key = SockAddrV1::from(e.addr);
            match &e.service {
                Some(s) => {
                    changed += usize::from(self.write_table(key, e.table.as_deref())?);
                    self.write_service(key, Some(service_entry(s)))?;
                }
                None => {
                    self.write_service(key, None)?;
                    self.write_table(key, None)?;
                }
            }
        }
        if changed > 0 {
            tracing::debug!(changed, "kernel endpoint tables updated");
        }
        Ok(())
    }

    /// Set or delete one services-map entry, unless it already holds that.
    fn write_service(&mut self, key: SockAddrV1, value: Option<ServiceV2>) -> Result<(), RedirectError> {
        let err = |source| RedirectError::Map { name: map::SERVICES, source };
        if self.services_written.get(&key) == value.as_ref() {
            return Ok(());
        }
        match value {
            Some(v) => {
                self.services.insert(key, v, 0).map_err(err)?;
                self.services_written.insert(key, v);
            }
            None => {
                match self.services.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(err(e)),
                }
                self.services_written.remove(&key);
            }
        }
        Ok(())
    }

    /// Set (encoding `eps`) or delete one endpoint table, unless it already holds that.
    /// Whether anything was written.
    fn write_table(&mut self, key: SockAddrV1, eps: Option<&[Weighted]>) -> Result<bool, RedirectError> {
        let err = |source| RedirectError::Map { name: map::BACKENDS, source };
        let Some(eps) = eps else {
            if self.backends_written.remove(&key).is_some() {
                match self.backends.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(err(e)),
                }
            }
            return Ok(false);
        };
        let value = table::encode(eps, &self.node);
        let digest = digest(&value);
        if self.backends_written.get(&key) == Some(&digest) {
            return Ok(false);
        }
        self.backends.insert(key, value, 0).map_err(err)?;
        self.backends_written.insert(key, digest);
        Ok(true)
    }

    /// Redirected sockets the kernel still tracks. Entries go when sockets close, so once
    /// every client is gone this is 0; anything else is a leak.
    pub fn tracked_sockets(&self) -> usize {
        self.sock_orig.keys().filter(Result::is_ok).count()
    }

    /// The kernel's decision counters, readable from anywhere (metrics, logs).
    pub fn counters(&self) -> Arc<KernelCounters> {
        Arc::clone(&self.counters)
    }

    /// The reader of the kernel's connection events (once: one reader per agent).
    pub fn events(&mut self) -> Result<Option<Events>, RedirectError> {
        let Some(ring) = self.events.take() else { return Ok(None) };
        let sock_orig = second_handle(&self.sock_orig, map::SOCK_ORIG)?;
        Events::new(ring, sock_orig, self.host_netns)
            .map(Some)
            .map_err(|source| RedirectError::Watch { name: map::EVENTS, source })
    }

    /// The maps behind pod coverage: path states and exclusions.
    pub fn pods(&mut self) -> &mut PodMaps {
        &mut self.pods
    }
}

/// What the kernel should hold for one service address: its service (none: the address
/// is no service's any more) and its endpoint table.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelEntry {
    pub addr: SocketAddr,
    pub service: Option<ServiceAddr>,
    pub table: Option<Vec<Weighted>>,
}

fn service_entry(s: &ServiceAddr) -> ServiceV2 {
    ServiceV2 { id: s.id, flags: if s.kernel { service::KERNEL } else { 0 } }
}

/// One service address as the kernel's services map holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceAddr {
    /// The service's index, for `bpftool map dump` readers.
    pub id: u32,
    pub addr: SocketAddr,
    /// `mode: kernel`: connects go straight to an endpoint of the table.
    pub kernel: bool,
}

/// Read and delete `key` of a hash map in one `BPF_MAP_LOOKUP_AND_DELETE_ELEM` call
/// (hash maps since Linux 5.14), where aya would make two: one system call less per
/// accepted connection. `None` when the key is not there.
fn take<K: aya::Pod, V: aya::Pod>(map: &MapData, key: &K) -> std::io::Result<Option<V>> {
    use std::os::fd::AsRawFd as _;
    /// The map-element member of `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for this command, its pointers point at a
    // key and a value buffer of the map's key and value types (aya checked their sizes
    // when the map was opened), and the kernel reads and writes only those.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>() as u32,
        )
    };
    if r == 0 {
        // SAFETY: the kernel filled the value (any bit pattern is a valid Pod).
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(e) }
}

fn digest(table: &BackendsV2) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    table.hash(&mut h);
    h.finish()
}

/// Another handle on a map the loader gave us, for a second owner (the proxy's tasks
/// and the reconciler each write to it, and aya's writes need exclusive access).
fn second_handle<K: aya::Pod, V: aya::Pod>(
    map: &impl aya::maps::IterableMap<K, V>,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, RedirectError> {
    let err = |source| RedirectError::Map { name, source };
    let fd = map.map().fd().as_fd().try_clone_to_owned().map_err(|e| RedirectError::Dup { name, source: e })?;
    let data = MapData::from_fd(fd).map_err(err)?;
    HashMap::try_from(aya::maps::Map::from_map_data(data).map_err(err)?).map_err(err)
}

/// Read side of the per-CPU decision counters.
pub struct KernelCounters(PerCpuArray<MapData, u64>);

impl KernelCounters {
    /// Each counter summed over CPUs, by name.
    pub fn read(&self) -> Result<Vec<(&'static str, u64)>, RedirectError> {
        counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, &name)| {
                let per_cpu =
                    self.0.get(&(i as u32), 0).map_err(|source| RedirectError::Map { name: map::COUNTERS, source })?;
                Ok((name, per_cpu.iter().sum()))
            })
            .collect()
    }
}

fn typed_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| RedirectError::Map { name, source })
}

/// Load program `name`, then either swap it into the link pinned for it (returns true) or
/// attach it to `cgroup` through a new bpf_link and pin that (returns false).
fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup_dir: &File,
    cgroup: &Path,
    cgroup_id: u64,
    pins: &PinDir,
) -> Result<bool, RedirectError> {
    let program = ebpf.program_mut(name).ok_or(RedirectError::Missing { kind: "program", name })?;
    let load_err = |source| RedirectError::Program { name, source };
    let attach_err = |source| RedirectError::Attach { name, cgroup: cgroup.to_owned(), source };
    let path = pins.link(name);
    let link_err = |source| RedirectError::Link { name, path: path.clone(), source };
    // The pinned link of a previous agent, if it is still attached to this cgroup. One on
    // another cgroup (agent.cgroup changed) is detached once the new link is in place.
    let mut stale = None;
    if path.exists() {
        let old = link::open_pinned(&path).map_err(|e| link_err(LinkPinError::Open(e)))?;
        match link::cgroup_id(old.as_fd()) {
            Ok(Some(id)) if id == cgroup_id => {
                let prog_fd = if name == prog::SOCK_OPS {
                    let p: &mut SockOps = program.try_into().map_err(load_err)?;
                    p.load().map_err(load_err)?;
                    p.fd().map_err(load_err)?.as_fd().try_clone_to_owned()
                } else {
                    let p: &mut CgroupSockAddr = program.try_into().map_err(load_err)?;
                    p.load().map_err(load_err)?;
                    p.fd().map_err(load_err)?.as_fd().try_clone_to_owned()
                };
                let prog_fd = prog_fd.map_err(|e| link_err(LinkPinError::Update(e)))?;
                link::update(old.as_fd(), prog_fd.as_fd()).map_err(|e| link_err(LinkPinError::Update(e)))?;
                return Ok(true);
            }
            _ => stale = Some(old),
        }
    }
    // Attached through bpf_link, which always coexists with other programs on the cgroup
    // (Cilium, systemd); the mode flag is for the legacy attach path only.
    let mode = CgroupAttachMode::Single;
    let link: FdLink = if name == prog::SOCK_OPS {
        let p: &mut SockOps = program.try_into().map_err(load_err)?;
        p.load().map_err(load_err)?;
        let id = p.attach(cgroup_dir, mode).map_err(attach_err)?;
        p.take_link(id).map_err(load_err)?.try_into().map_err(|e| link_err(LinkPinError::NotFdLink(e)))?
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(load_err)?;
        p.load().map_err(load_err)?;
        let id = p.attach(cgroup_dir, mode).map_err(attach_err)?;
        p.take_link(id).map_err(load_err)?.try_into().map_err(|e| link_err(LinkPinError::NotFdLink(e)))?
    };
    if let Some(old) = stale {
        warn!(program = name, cgroup = %cgroup.display(), "moving the program from the cgroup it was attached to before");
        match link::detach(old.as_fd()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
            Err(e) => return Err(link_err(LinkPinError::Detach(e))),
        }
        std::fs::remove_file(&path).map_err(|e| link_err(LinkPinError::Remove(e)))?;
    }
    // Pinned, the link stays attached after the process ends (see the module docs).
    link.pin(&path).map_err(|e| link_err(LinkPinError::Pin(e)))?;
    Ok(false)
}
