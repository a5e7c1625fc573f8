//! The kernel side, seen from the agent: load the embedded eBPF object, fill its maps,
//! attach its programs to a cgroup, and read what they record. The only user of aya.
//!
//! Lifetime: everything attached belongs to [`Redirect`]. Dropping it (normal exit, an
//! error half-way through `start`, a panic) closes the link fds and so detaches every
//! program; a killed process gets the same from the kernel when its fds close. Nothing is
//! pinned, so nothing outlives the agent.

mod host;

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, SockOps},
};
pub use host::{HostError, attach_cgroup, cgroup2_root, check_privileges};
use switchyard_common::{AgentV1, OrigDstV2, ServiceV1, SockAddrV1, counter, map, prog};
use tracing::info;

/// The compiled programs, built by build.rs from `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/switchyard-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("load the eBPF object into the kernel")]
    Load(#[source] aya::EbpfError),
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
}

/// Loaded and attached programs plus the maps the agent writes. Detaches on drop.
pub struct Redirect {
    cgroup: PathBuf,
    services: HashMap<MapData, SockAddrV1, ServiceV1>,
    counters: Arc<KernelCounters>,
    sock_orig: HashMap<MapData, u64, OrigDstV2>,
    // Last: dropping it detaches the programs, after everything above is done with.
    ebpf: Ebpf,
}

/// Read side of `SY_CLIENT_ORIG`, shared by the proxy's connection tasks.
pub struct OrigDstTable {
    map: HashMap<MapData, SockAddrV1, OrigDstV2>,
}

/// Where a redirected client meant to go, and who it is.
#[derive(Debug, Clone)]
pub struct Origin {
    pub dst: SocketAddr,
    pub pid: u32,
    pub cgroup_id: u64,
    pub comm: String,
}

impl OrigDstTable {
    /// The original destination and client of a connection the agent accepted, by its
    /// peer address. The kernel removes the entry when the client socket closes.
    pub fn lookup(&self, client: SocketAddr) -> Option<Origin> {
        let o = self.map.get(&SockAddrV1::from(client), 0).ok()?;
        Some(Origin { dst: o.dst.to_socket_addr(), pid: o.pid, cgroup_id: o.cgroup_id, comm: o.comm_str().to_owned() })
    }
}

impl Redirect {
    /// Load the programs, publish `agent` and the service addresses, then attach to
    /// `cgroup`. The caller must have bound the listeners named in `agent` already: from
    /// the moment the first connect program is attached, connections go there.
    pub fn start(
        cgroup: &Path,
        agent: AgentV1,
        services: impl IntoIterator<Item = (u32, SocketAddr)>,
    ) -> Result<(Self, OrigDstTable), RedirectError> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(RedirectError::Load)?;

        let services_map = typed_map(&mut ebpf, map::SERVICES)?;
        let mut agent_map: Array<_, AgentV1> = typed_map(&mut ebpf, map::AGENT)?;
        agent_map.set(0, agent, 0).map_err(|source| RedirectError::Map { name: map::AGENT, source })?;
        let orig = OrigDstTable { map: typed_map(&mut ebpf, map::CLIENT_ORIG)? };
        let counters = Arc::new(KernelCounters(typed_map(&mut ebpf, map::COUNTERS)?));
        let sock_orig = typed_map(&mut ebpf, map::SOCK_ORIG)?;
        let mut redirect = Self { cgroup: cgroup.to_owned(), services: services_map, counters, sock_orig, ebpf };
        redirect.sync_services(services)?;

        let cgroup_dir =
            File::open(cgroup).map_err(|source| RedirectError::OpenCgroup { path: cgroup.to_owned(), source })?;
        // sock_ops and getpeername first, connect last: by the time a connect can be
        // redirected, everything that follows it through is in place.
        for name in prog::ALL {
            attach(&mut redirect.ebpf, name, &cgroup_dir, cgroup)?;
        }
        info!(cgroup = %cgroup.display(), programs = prog::ALL.len(), "attached redirect programs");
        Ok((redirect, orig))
    }

    /// Make the kernel's service addresses exactly `services`: add the new, delete the gone.
    /// Entries that stay are never deleted, so connects to them are redirected throughout.
    pub fn sync_services(
        &mut self,
        services: impl IntoIterator<Item = (u32, SocketAddr)>,
    ) -> Result<(), RedirectError> {
        let err = |source| RedirectError::Map { name: map::SERVICES, source };
        let want: std::collections::HashMap<SockAddrV1, u32> =
            services.into_iter().map(|(id, addr)| (SockAddrV1::from(addr), id)).collect();
        let have: Vec<SockAddrV1> = self.services.keys().collect::<Result<_, _>>().map_err(err)?;
        for key in have.iter().filter(|k| !want.contains_key(k)) {
            self.services.remove(key).map_err(err)?;
        }
        for (key, id) in want {
            self.services.insert(key, ServiceV1 { id, _reserved: 0 }, 0).map_err(err)?;
        }
        Ok(())
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

impl Drop for Redirect {
    fn drop(&mut self) {
        info!(cgroup = %self.cgroup.display(), "detaching redirect programs");
    }
}

fn typed_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| RedirectError::Map { name, source })
}

fn attach(ebpf: &mut Ebpf, name: &'static str, cgroup_dir: &File, cgroup: &Path) -> Result<(), RedirectError> {
    let program = ebpf.program_mut(name).ok_or(RedirectError::Missing { kind: "program", name })?;
    let load_err = |source| RedirectError::Program { name, source };
    let attach_err = |source| RedirectError::Attach { name, cgroup: cgroup.to_owned(), source };
    // Attached through bpf_link, which always coexists with other programs on the cgroup
    // (Cilium, systemd, a second agent during an upgrade); the mode flag is for the legacy
    // attach path only.
    let mode = CgroupAttachMode::Single;
    if name == prog::SOCK_OPS {
        let p: &mut SockOps = program.try_into().map_err(load_err)?;
        p.load().map_err(load_err)?;
        p.attach(cgroup_dir, mode).map_err(attach_err)?;
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(load_err)?;
        p.load().map_err(load_err)?;
        p.attach(cgroup_dir, mode).map_err(attach_err)?;
    }
    Ok(())
}
