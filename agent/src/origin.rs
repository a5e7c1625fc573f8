//! Where a redirected connection was going, and who opened it: the seam between the
//! kernel and the proxy. In production the connect programs record it and the proxy
//! takes it from their map (`redirect::OrigDstTable`); in-process tests, which cannot
//! attach programs without root, give the proxy a [`Fixed`] table instead, so everything
//! above the kernel (detection, balancing, HTTP, the admin API) runs unprivileged.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use switchyard_common::OrigDstV3;

/// Where a redirected client meant to go, and who it is.
#[derive(Debug, Clone)]
pub struct Origin {
    pub dst: SocketAddr,
    pub pid: u32,
    pub cgroup_id: u64,
    pub comm: Comm,
    /// Cookie of the client's network namespace.
    pub netns: u64,
    /// True when that is not the agent's namespace: the client is a pod.
    pub pod: bool,
}

impl Origin {
    /// What the connect program recorded (`o`), going to `dst`; `pod` if it came from
    /// another network namespace than the agent's.
    pub fn recorded(o: &OrigDstV3, dst: SocketAddr, pod: bool) -> Self {
        Self { dst, pid: o.pid, cgroup_id: o.cgroup_id, comm: Comm::new(&o.comm), netns: o.netns_cookie, pod }
    }
}

/// A process's command name as the kernel keeps it (16 bytes, NUL-padded), held inline:
/// every connection entry has one, and a `String` was an allocation per connection.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Comm([u8; 16]);

impl Comm {
    /// From the kernel's bytes (the first 16; a name is cut at its first NUL).
    pub fn new(raw: &[u8]) -> Self {
        let mut bytes = [0; 16];
        let n = raw.len().min(16);
        bytes[..n].copy_from_slice(&raw[..n]);
        Self(bytes)
    }

    /// As text (`?` if it is not UTF-8, as a name cut mid-character can be).
    pub fn as_str(&self) -> &str {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        std::str::from_utf8(&self.0[..end]).unwrap_or("?")
    }
}

impl std::fmt::Display for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
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
        Some(Origin { dst, pid: std::process::id(), cgroup_id: 0, comm: Comm::new(b"test"), netns: 0, pod: false })
    }
}

#[cfg(test)]
mod tests {
    use super::Comm;

    #[test]
    fn a_command_name_reads_up_to_its_nul_and_a_broken_one_shows_as_a_question_mark() {
        assert_eq!(Comm::new(b"redis-cli\0\0\0\0\0\0\0").as_str(), "redis-cli");
        assert_eq!(Comm::new(b"0123456789abcdefTOO_LONG").as_str(), "0123456789abcdef");
        // A name the kernel cut inside a multi-byte character.
        assert_eq!(Comm::new(&[b'x', 0xc3, 0]).to_string(), "?");
        assert_eq!(Comm::new(b"").as_str(), "");
    }
}
