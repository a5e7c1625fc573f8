//! Where a redirected connection was going, and who opened it: the seam between the
//! kernel and the proxy. In production the connect programs record it and the proxy
//! takes it from their map (`redirect::OrigDstTable`); in-process tests, which cannot
//! attach programs without root, give the proxy a [`Fixed`] table instead, so everything
//! above the kernel (detection, balancing, HTTP, the admin API) runs unprivileged.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

/// Where a redirected client meant to go, and who it is.
#[derive(Debug, Clone)]
pub struct Origin {
    pub dst: SocketAddr,
    pub pid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    /// Cookie of the client's network namespace.
    pub netns: u64,
    /// True when that is not the agent's namespace: the client is a pod.
    pub pod: bool,
}

/// A source of original destinations, asked once per accepted connection.
pub trait Origins: Send + Sync {
    /// The origin of the connection the agent accepted from `peer`; `None` if it was not
    /// redirected (someone dialled the listener directly).
    fn lookup(&self, peer: SocketAddr) -> Option<Origin>;
}

/// A fixed table, for tests: connections from a listed client address went to its
/// destination; from any other, to the default (if there is one).
#[derive(Debug, Default, Clone)]
pub struct Fixed {
    by_client: HashMap<IpAddr, SocketAddr>,
    default: Option<SocketAddr>,
}

impl Fixed {
    /// Every connection went to `dst`.
    pub fn all(dst: SocketAddr) -> Self {
        Self { by_client: HashMap::new(), default: Some(dst) }
    }

    /// Connections from `client` (any port) went to `dst`.
    pub fn with(mut self, client: IpAddr, dst: SocketAddr) -> Self {
        self.by_client.insert(client, dst);
        self
    }
}

impl Origins for Fixed {
    fn lookup(&self, peer: SocketAddr) -> Option<Origin> {
        let dst = self.by_client.get(&peer.ip()).copied().or(self.default)?;
        Some(Origin { dst, pid: std::process::id(), cgroup_id: 0, comm: "test".into(), netns: 0, pod: false })
    }
}
