//! Upgrade hand-over: the running agent gives its listening sockets to a newer agent
//! started on the same node, so there is never a moment without a listener (no refused
//! connect) and the old agent's open connections finish where they are (none cut).
//!
//! Over a unix socket (`agent.handover_socket`, mode 0600 in a 0700 directory; the peer
//! must also be root or our own user):
//!
//! ```text
//! new -> old   "TAKEOVER 1\n"
//! old -> new   "LISTENERS v4 v6 node4 node6 admin\n" + the listening fds (SCM_RIGHTS), in
//!              that order; the names say which are there (an agent from before pods were
//!              covered sends no node4/node6, and its successor binds those itself)
//!              (the new agent loads and attaches its programs, starts accepting)
//! new -> old   "READY\n"
//! ```
//!
//! Both processes then hold the same sockets: the accept queue is shared, so whichever
//! accepts first serves a connection. On READY the old agent stops accepting, drains
//! its open connections (up to `agent.drain_timeout_secs`) and exits, leaving the pins
//! to its successor. If the new agent fails before READY, the old one never stopped.

use std::{
    io::{self, BufRead as _, BufReader, IoSlice, IoSliceMut, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::{fs::DirBuilderExt as _, fs::PermissionsExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg, sockopt};
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::proxy::Inherited as Listening;

const REQUEST: &str = "TAKEOVER 1";
const READY: &str = "READY";
/// How long the old agent waits for READY: the new one loads its programs and, with
/// Kubernetes discovery, waits for the first sync (up to 30 s) before it is ready.
const READY_WAIT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("ask the running agent at {} for its listeners", path.display())]
    Request {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the running agent at {} answered `{answer}`, not a list of listeners; is it another \
         program, or a switchyard too old to hand over? Stop it first",
        path.display()
    )]
    Protocol { path: PathBuf, answer: String },
    #[error("tell the previous agent that this one is ready")]
    Ready(#[source] io::Error),
    #[error("serve hand-over requests at {} (agent.handover_socket)", path.display())]
    Serve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Listening sockets received from the previous agent, and the line to answer it on.
pub struct Inherited {
    pub listeners: Listening,
    pub admin: Option<OwnedFd>,
    pub predecessor: Predecessor,
}

/// The names of the hand-over message, in order.
const NAMES: [&str; 5] = ["v4", "v6", "node4", "node6", "admin"];

/// The previous agent, waiting for us to be ready.
pub struct Predecessor(UnixStream);

impl Predecessor {
    /// Tell the previous agent we accept on the sockets now: it stops accepting and drains.
    pub fn ready(mut self) -> Result<(), HandoverError> {
        self.0.write_all(format!("{READY}\n").as_bytes()).map_err(HandoverError::Ready)
    }
}

/// Ask the agent serving at `path` for its listeners. `None` when no agent answers there
/// (no socket file, or a stale one left by a killed agent): the caller binds its own.
pub fn take_over(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let err = |source| HandoverError::Request { path: path.to_owned(), source };
    let mut conn = match UnixStream::connect(path) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(err)?;
    conn.write_all(format!("{REQUEST}\n").as_bytes()).map_err(err)?;
    let mut buf = [0u8; 256];
    let mut space = nix::cmsg_space!([RawFd; NAMES.len()]);
    let (text, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| err(e.into()))?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(|e| err(e.into()))? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: SCM_RIGHTS just installed these fds in this process; we own them.
                fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, fds)
    };
    let line = String::from_utf8_lossy(&buf[..text]).trim().to_owned();
    let names: Vec<&str> = match line.strip_prefix("LISTENERS ") {
        Some(names) => names.split_whitespace().collect(),
        None => return Err(HandoverError::Protocol { path: path.to_owned(), answer: line }),
    };
    if names.len() != fds.len() || names.first() != Some(&"v4") {
        return Err(HandoverError::Protocol {
            path: path.to_owned(),
            answer: format!("{line} with {} fds", fds.len()),
        });
    }
    let mut named: Vec<(&str, OwnedFd)> = names.into_iter().zip(fds).collect();
    let mut take = |name: &str| named.iter().position(|(n, _)| *n == name).map(|i| named.remove(i).1);
    let listeners = Listening { v4: take("v4"), v6: take("v6"), node_v4: take("node4"), node_v6: take("node6") };
    Ok(Some(Inherited { listeners, admin: take("admin"), predecessor: Predecessor(conn) }))
}

/// What a running agent can hand over: duplicates of its listening sockets.
pub struct Offer {
    pub listeners: Listening,
    pub admin: Option<OwnedFd>,
}

impl Offer {
    fn named(&self) -> (String, Vec<BorrowedFd<'_>>) {
        let l = &self.listeners;
        let (names, fds): (Vec<&str>, Vec<BorrowedFd<'_>>) = NAMES
            .into_iter()
            .zip([&l.v4, &l.v6, &l.node_v4, &l.node_v6, &self.admin])
            .filter_map(|(name, fd)| Some((name, fd.as_ref()?.as_fd())))
            .unzip();
        (format!("LISTENERS {}\n", names.join(" ")), fds)
    }
}

/// Create the hand-over socket's directory (mode 0700) if missing. Done before anything
/// else so that a path we cannot use is reported before we take over from anyone.
pub fn prepare(path: &Path) -> Result<(), HandoverError> {
    let err = |source| HandoverError::Serve { path: path.to_owned(), source };
    match path.parent() {
        Some(dir) => std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err),
        None => Ok(()),
    }
}

/// Bind the hand-over socket at `path`, replacing any file there (a killed agent's stale
/// socket, or the one of the agent we just took over from, which no longer needs it).
pub fn bind(path: &Path) -> Result<UnixListener, HandoverError> {
    let err = |source| HandoverError::Serve { path: path.to_owned(), source };
    prepare(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serve hand-over requests until one succeeds (its READY arrived); returns the pid of the
/// successor when the kernel tells it. Failed attempts are logged and the next is awaited.
pub async fn serve(listener: UnixListener, offer: Offer) -> Option<i32> {
    let offer = std::sync::Arc::new(offer);
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                warn!(error = %e, "hand-over accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(conn) = conn.into_std() else { continue };
        let offer = std::sync::Arc::clone(&offer);
        let outcome = tokio::task::spawn_blocking(move || hand_over(conn, &offer)).await;
        match outcome {
            Ok(Ok(pid)) => return pid,
            Ok(Err(e)) => warn!(error = %e, "a hand-over did not complete; still serving"),
            Err(e) => warn!(error = %e, "hand-over task failed; still serving"),
        }
    }
}

/// One hand-over, blocking: check the peer, send the sockets, wait for READY.
fn hand_over(conn: UnixStream, offer: &Offer) -> io::Result<Option<i32>> {
    conn.set_nonblocking(false)?;
    let peer = nix::sys::socket::getsockopt(&conn, sockopt::PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() != 0 && peer.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing hand-over to uid {} (pid {})", peer.uid(), peer.pid()),
        ));
    }
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim() != REQUEST {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected request {:?}", line.trim())));
    }
    let (header, fds) = offer.named();
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(header.as_bytes())],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )?;
    info!(successor.pid = peer.pid(), "listeners handed to a new agent; waiting for it to be ready");
    conn.set_read_timeout(Some(READY_WAIT))?;
    line.clear();
    reader.read_line(&mut line)?;
    if line.trim() != READY {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the new agent went away before it was ready"));
    }
    Ok(Some(peer.pid()))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[tokio::test]
    async fn listeners_go_to_the_successor_and_the_old_side_learns_it_is_ready() {
        let path = std::env::temp_dir().join(format!("sy-handover-test-{}/h.sock", std::process::id()));
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let node = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let listeners = Listening {
            v4: Some(v4.as_fd().try_clone_to_owned().unwrap()),
            node_v4: Some(node.as_fd().try_clone_to_owned().unwrap()),
            ..Default::default()
        };
        let offer = Offer { listeners, admin: Some(admin.as_fd().try_clone_to_owned().unwrap()) };
        assert!(take_over(&path).unwrap().is_none(), "no agent there yet: bind our own");
        let server = tokio::spawn(serve(bind(&path).unwrap(), offer));

        let p = path.clone();
        let inherited =
            tokio::task::spawn_blocking(move || take_over(&p).unwrap().expect("an agent answers")).await.unwrap();
        let local = |fd: OwnedFd| std::net::TcpListener::from(fd).local_addr().unwrap();
        let got = inherited.listeners;
        assert!(got.v6.is_none() && got.node_v6.is_none());
        let admin_fd = inherited.admin.expect("admin handed over");
        assert_eq!(local(admin_fd), admin.local_addr().unwrap());
        assert_eq!(local(got.v4.unwrap()), v4.local_addr().unwrap(), "the same listening socket");
        assert_eq!(local(got.node_v4.unwrap()), node.local_addr().unwrap(), "each by its name");
        assert!(!server.is_finished(), "the old side waits for READY");
        inherited.predecessor.ready().unwrap();
        let successor = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
        assert_eq!(successor, Some(std::process::id() as i32));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[tokio::test]
    async fn a_successor_that_goes_away_before_ready_leaves_the_old_side_serving() {
        let path = std::env::temp_dir().join(format!("sy-handover-test2-{}/h.sock", std::process::id()));
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = Listening { v4: Some(v4.as_fd().try_clone_to_owned().unwrap()), ..Default::default() };
        let offer = Offer { listeners, admin: None };
        let server = tokio::spawn(serve(bind(&path).unwrap(), offer));
        let p = path.clone();
        let first = tokio::task::spawn_blocking(move || take_over(&p).unwrap().is_some()).await.unwrap();
        assert!(first, "listeners received, then dropped without READY");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!server.is_finished(), "still serving");
        // A second successor can still take over.
        let p = path.clone();
        let second = tokio::task::spawn_blocking(move || take_over(&p).unwrap().unwrap()).await.unwrap();
        second.predecessor.ready().unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(5), server).await.is_ok());
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
