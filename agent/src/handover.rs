//! Upgrade hand-over: the running agent gives its listening sockets to a newer agent
//! started on the same node, so there is never a moment without a listener (no refused
//! connect) and the old agent's open connections finish where they are (none cut).
//!
//! Over a unix socket (`agent.handover_socket`, mode 0600 in a 0700 directory; the peer
//! must also be root or our own user):
//!
//! ```text
//! new -> old   "TAKEOVER 2 switchyard/0.1.0\n"          (protocol, the new agent's version)
//! old -> new   "LISTENERS2 switchyard/0.1.0 v4 v6 node4 node6 admin\n" + the listening fds
//!              (SCM_RIGHTS), in that order; the names say which are there (an agent from
//!              before pods were covered sends no node4/node6, and its successor binds
//!              those itself)
//!          or  "REFUSED <why>\n" (a protocol it does not speak): it keeps serving
//!              (the new agent loads and attaches its programs, starts accepting)
//! new -> old   "READY\n"
//! ```
//!
//! Versions: protocol 1 is the same exchange without versions (`TAKEOVER 1`, answered by
//! `LISTENERS <names>`); an agent speaks both, so builds on either side of the change hand
//! over to each other. A request for a protocol an agent does not know is refused with a
//! reason, and the successor stops with that message while the running agent serves on.
//! The pinned maps carry their layout version in their names (`SY_SOCK_ORIG3`): a build
//! with another layout pins its own and removes the old one's, so the two never read each
//! other's bytes.
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

/// The hand-over protocol this build speaks, and the oldest it still answers.
///
/// `SWITCHYARD_HANDOVER_PROTOCOLS=OLDEST-NEWEST` and `SWITCHYARD_BUILD_VERSION` at build
/// time make another build: what the upgrade tests hand over to and from
/// (`cargo xtask test` builds two, see tests/tests/reliability.rs), so "a different version"
/// there is a different binary rather than a test pretending to be one.
const PROTOCOLS: (u32, u32) = match option_env!("SWITCHYARD_HANDOVER_PROTOCOLS") {
    Some(range) => parse_range(range.as_bytes()),
    None => (1, 2),
};
const OLDEST: u32 = PROTOCOLS.0;
const PROTOCOL: u32 = PROTOCOLS.1;
/// This build, as the other side of a hand-over is told.
pub const VERSION: &str = match option_env!("SWITCHYARD_BUILD_VERSION") {
    Some(version) => version,
    None => concat!("switchyard/", env!("CARGO_PKG_VERSION")),
};

/// `"1-2"` as (1, 2), at compile time; anything else fails the build.
const fn parse_range(text: &[u8]) -> (u32, u32) {
    let (mut range, mut at, mut i) = ([0u32; 2], 0, 0);
    while i < text.len() {
        match text[i] {
            b'-' if at == 0 && i > 0 => at = 1,
            d @ b'0'..=b'9' => range[at] = range[at] * 10 + (d - b'0') as u32,
            _ => panic!("SWITCHYARD_HANDOVER_PROTOCOLS is OLDEST-NEWEST, for example 1-2"),
        }
        i += 1;
    }
    assert!(at == 1 && range[0] >= 1 && range[0] <= range[1], "SWITCHYARD_HANDOVER_PROTOCOLS: 1 <= OLDEST <= NEWEST");
    (range[0], range[1])
}
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
    #[error(
        "the running agent at {} refused to hand over: {why}. It keeps serving; stop it \
         (SIGTERM) to replace it with this build ({VERSION})",
        path.display()
    )]
    Refused { path: PathBuf, why: String },
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
    /// The previous agent's version (`None`: a build from before versions were sent).
    pub version: Option<String>,
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
    conn.write_all(format!("TAKEOVER {PROTOCOL} {VERSION}\n").as_bytes()).map_err(err)?;
    let (line, fds) = receive(&conn).map_err(err)?;
    let line = line.trim().to_owned();
    if let Some(why) = line.strip_prefix("REFUSED ") {
        return Err(HandoverError::Refused { path: path.to_owned(), why: why.to_owned() });
    }
    let (version, names): (Option<String>, Vec<&str>) = if let Some(rest) = line.strip_prefix("LISTENERS2 ") {
        let mut words = rest.split_whitespace();
        (words.next().map(str::to_owned), words.collect())
    } else if let Some(names) = line.strip_prefix("LISTENERS ") {
        (None, names.split_whitespace().collect())
    } else {
        return Err(HandoverError::Protocol { path: path.to_owned(), answer: line });
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
    Ok(Some(Inherited { listeners, admin: take("admin"), predecessor: Predecessor(conn), version }))
}

/// One message from the other side: its text and the fds that came with it.
fn receive(conn: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = [0u8; 256];
    let mut space = nix::cmsg_space!([RawFd; NAMES.len()]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: SCM_RIGHTS just installed these fds in this process; we own them.
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let bytes = msg.bytes;
    Ok((String::from_utf8_lossy(&buf[..bytes]).into_owned(), fds))
}

/// What a running agent can hand over: duplicates of its listening sockets.
pub struct Offer {
    pub listeners: Listening,
    pub admin: Option<OwnedFd>,
}

impl Offer {
    /// The answer line for a successor speaking `protocol`, and the fds it names.
    fn named(&self, protocol: u32) -> (String, Vec<BorrowedFd<'_>>) {
        let l = &self.listeners;
        let (names, fds): (Vec<&str>, Vec<BorrowedFd<'_>>) = NAMES
            .into_iter()
            .zip([&l.v4, &l.v6, &l.node_v4, &l.node_v6, &self.admin])
            .filter_map(|(name, fd)| Some((name, fd.as_ref()?.as_fd())))
            .unzip();
        let names = names.join(" ");
        let line =
            if protocol >= 2 { format!("LISTENERS2 {VERSION} {names}\n") } else { format!("LISTENERS {names}\n") };
        (line, fds)
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
    let (protocol, version) = match request(&line) {
        Ok(request) => request,
        Err(why) => {
            // Said to the successor, which stops with it; we serve on.
            let _ = (&conn).write_all(format!("REFUSED {why}\n").as_bytes());
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
    };
    let (header, fds) = offer.named(protocol);
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(header.as_bytes())],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )?;
    info!(
        successor.pid = peer.pid(),
        successor.version = version.as_deref().unwrap_or("unknown (protocol 1)"),
        "listeners handed to a new agent; waiting for it to be ready"
    );
    conn.set_read_timeout(Some(READY_WAIT))?;
    line.clear();
    reader.read_line(&mut line)?;
    if line.trim() != READY {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the new agent went away before it was ready"));
    }
    Ok(Some(peer.pid()))
}

/// A successor's request line: its protocol and version, or why it is refused.
fn request(line: &str) -> Result<(u32, Option<String>), String> {
    let mut words = line.split_whitespace();
    let (Some("TAKEOVER"), Some(protocol)) = (words.next(), words.next()) else {
        return Err(format!("`{}` is not a hand-over request", line.trim()));
    };
    let version = words.next().map(str::to_owned);
    let from = version.as_deref().unwrap_or("a successor");
    match protocol.parse::<u32>() {
        Ok(p) if (OLDEST..=PROTOCOL).contains(&p) => Ok((p, version)),
        _ => Err(format!(
            "{from} asks for hand-over protocol {protocol}; this agent ({VERSION}) speaks {OLDEST} to {PROTOCOL}"
        )),
    }
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

    /// The old side's answer to a request `line` sent as a successor of another build
    /// would send it, and whether it then still serves.
    async fn answer_to(line: &'static str, tag: &str) -> (String, Vec<OwnedFd>, bool) {
        let path = std::env::temp_dir().join(format!("sy-handover-{tag}-{}/h.sock", std::process::id()));
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listeners = Listening { v4: Some(v4.as_fd().try_clone_to_owned().unwrap()), ..Default::default() };
        let server = tokio::spawn(serve(bind(&path).unwrap(), Offer { listeners, admin: None }));
        let p = path.clone();
        let (answer, fds) = tokio::task::spawn_blocking(move || {
            let mut conn = UnixStream::connect(&p).unwrap();
            conn.write_all(format!("{line}\n").as_bytes()).unwrap();
            receive(&conn).unwrap()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let serving = !server.is_finished();
        server.abort();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
        (answer, fds, serving)
    }

    #[tokio::test]
    async fn a_build_speaking_an_unknown_protocol_is_refused_with_a_reason_and_the_old_side_serves_on() {
        let (answer, fds, serving) = answer_to("TAKEOVER 9 switchyard/9.0.0", "refuse").await;
        assert_eq!(
            answer.trim(),
            format!("REFUSED switchyard/9.0.0 asks for hand-over protocol 9; this agent ({VERSION}) speaks 1 to 2")
        );
        assert!(fds.is_empty() && serving, "no sockets given, still serving");
        let (answer, _, serving) = answer_to("HELLO", "garbage").await;
        assert_eq!(answer.trim(), "REFUSED `HELLO` is not a hand-over request");
        assert!(serving);
    }

    #[tokio::test]
    async fn an_older_build_asking_with_protocol_1_gets_the_answer_it_understands() {
        let (answer, fds, _) = answer_to("TAKEOVER 1", "older").await;
        assert_eq!(answer, "LISTENERS v4\n", "no version word an older parser would take for a name");
        assert_eq!(fds.len(), 1);
        let (answer, fds, _) = answer_to("TAKEOVER 2 switchyard/0.0.9", "newer").await;
        assert_eq!(answer, format!("LISTENERS2 {VERSION} v4\n"));
        assert_eq!(fds.len(), 1);
    }

    #[test]
    fn a_refusal_reaches_the_successor_as_a_clear_error() {
        let path = std::env::temp_dir().join(format!("sy-handover-refused-{}/h.sock", std::process::id()));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let old = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(conn.try_clone().unwrap()).read_line(&mut line).unwrap();
            conn.write_all(b"REFUSED switchyard/0.1.0 asks for hand-over protocol 2; this agent speaks 1 to 1\n")
                .unwrap();
            line
        });
        let err = take_over(&path).err().expect("refused");
        let sent = old.join().unwrap();
        assert_eq!(sent, format!("TAKEOVER 2 {VERSION}\n"), "the request carries protocol and version");
        let text = err.to_string();
        assert!(text.contains("refused to hand over: switchyard/0.1.0 asks for hand-over protocol 2"), "{text}");
        assert!(text.contains("It keeps serving; stop it (SIGTERM)"), "{text}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
