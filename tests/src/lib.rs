//! Harness for the root-only end-to-end tests.
//!
//! Every test builds its own [`Topology`]: a "node" network namespace (where the agent and
//! the clients run, as on a Kubernetes node) joined by a veth pair to a "backend" namespace
//! (where the endpoints listen, as on other hosts), plus a child cgroup of the cgroup v2
//! root that the agent attaches to. Nothing is attached anywhere else, service addresses
//! (10.96.0.0/16, fd96::/64) exist only inside the node namespace, which has no route for
//! them, so a connect that is not redirected fails with ENETUNREACH and never leaves the
//! machine. Guards remove namespaces and cgroups on drop, panics included.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// Addresses of the test topology.
pub mod addr {
    /// The node's end of the veth.
    pub const NODE_V4: &str = "10.10.0.1";
    pub const NODE_V6: &str = "fd10::1";
    /// Two backend "hosts" (two addresses on the backend end of the veth).
    pub const BACKEND_V4: [&str; 2] = ["10.10.0.2", "10.10.0.3"];
    pub const BACKEND_V6: [&str; 2] = ["fd10::2", "fd10::3"];
}

/// True when the test may run. Without root it says so loudly and skips, except under
/// `CI=true`, where a skipped end-to-end test would be a silent pass: there it panics.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: end-to-end tests need root, and CI=true forbids skipping them");
    }
    eprintln!("\n*** SKIPPED {test}: needs root (run `cargo xtask test` as root) ***\n");
    false
}

/// Panics naming the first missing tool; `cargo xtask test` installs them all.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|dir| dir.join(tool).is_file()))
            .unwrap_or(false);
        assert!(found, "required tool `{tool}` is not on PATH; `cargo xtask bootstrap` installs it");
    }
}

/// The cgroup v2 mount point, from /proc/mounts (it is /sys/fs/cgroup/unified on hybrid
/// hosts, /sys/fs/cgroup on most).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("no cgroup2 mount in /proc/mounts")
}

/// The switchyard binary under test: $SWITCHYARD_BIN, else the workspace's debug build.
pub fn switchyard_bin() -> PathBuf {
    let bin = std::env::var_os("SWITCHYARD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/switchyard"));
    assert!(bin.is_file(), "{} does not exist: build it first (`cargo xtask test` does)", bin.display());
    bin
}

/// The probe client/server built from this crate. Cargo builds a package's binaries
/// before its integration tests and puts them one level above the test executable
/// (`target/<profile>/sy-probe` beside `target/<profile>/deps/redirect-*`).
pub fn probe_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("sy-probe");
    assert!(bin.is_file(), "{} is missing: run the tests through cargo", bin.display());
    bin
}

fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{:x}x{}", std::process::id() & 0xffff, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Run a command to completion, panicking with its output if it fails.
pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &str) {
    sh(Command::new("ip").args(args.split_whitespace()));
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
    file: File,
}

impl Netns {
    fn new(name: String) -> Self {
        ip(&format!("netns add {name}"));
        ip(&format!("-n {name} link set lo up"));
        let file = File::open(format!("/run/netns/{name}")).expect("open netns file");
        Self { name, file }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A child cgroup of the cgroup v2 root. On drop, every process still in it (only ever
/// ours) is killed through cgroup.kill, and the directory removed.
pub struct Cgroup {
    pub path: PathBuf,
    procs: File,
}

impl Cgroup {
    fn new(name: &str) -> Self {
        let path = cgroup2_root().join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        let procs = File::options().write(true).open(path.join("cgroup.procs")).expect("open cgroup.procs");
        Self { path, procs }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node and backend namespaces, the veth between them, and the test's cgroup.
pub struct Topology {
    pub node: Netns,
    pub backend: Netns,
    pub cgroup: Cgroup,
    pub dir: tempfile::TempDir,
}

impl Topology {
    pub fn new() -> Self {
        let id = unique("sy");
        let node = Netns::new(format!("{id}-node"));
        let backend = Netns::new(format!("{id}-be"));
        let (a, b) = (format!("{id}a"), format!("{id}b"));
        ip(&format!("-n {} link add {a} type veth peer name {b} netns {}", node.name, backend.name));
        ip(&format!("-n {} addr add {}/24 dev {a}", node.name, addr::NODE_V4));
        ip(&format!("-n {} addr add {}/64 dev {a} nodad", node.name, addr::NODE_V6));
        ip(&format!("-n {} link set {a} up", node.name));
        for v4 in addr::BACKEND_V4 {
            ip(&format!("-n {} addr add {v4}/24 dev {b}", backend.name));
        }
        for v6 in addr::BACKEND_V6 {
            ip(&format!("-n {} addr add {v6}/64 dev {b} nodad", backend.name));
        }
        ip(&format!("-n {} link set {b} up", backend.name));
        let cgroup = Cgroup::new(&format!("switchyard-test-{id}"));
        let dir = tempfile::Builder::new().prefix("switchyard-test-").tempdir().expect("temp dir");
        Self { node, backend, cgroup, dir }
    }

    /// Make `cmd` start inside the node namespace, and inside the test cgroup (where the
    /// programs are attached) when `in_cgroup`.
    pub fn in_node<'c>(&self, cmd: &'c mut Command, in_cgroup: bool) -> &'c mut Command {
        enter(cmd, &self.node, in_cgroup.then_some(&self.cgroup))
    }

    /// Make `cmd` start inside the backend namespace.
    pub fn in_backend<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        enter(cmd, &self.backend, None)
    }

    /// Start a server in the backend namespace and wait until `ready` says it is up.
    pub fn backend_server(&self, cmd: &mut Command, ready: impl Fn() -> bool) -> Proc {
        let child = self.in_backend(cmd).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let proc = Proc(child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")));
        eventually(Duration::from_secs(10), &format!("{cmd:?} to come up"), ready);
        proc
    }

    /// The probe echo server on `port` of every backend address, v4 and v6. Returns once
    /// each address answers from the node namespace (IPv6 neighbour discovery on a fresh
    /// veth can lag behind the bind).
    pub fn echo_servers(&self, port: u16) -> Proc {
        let targets: Vec<String> = addr::BACKEND_V4
            .iter()
            .map(|a| format!("{a}:{port}"))
            .chain(addr::BACKEND_V6.iter().map(|a| format!("[{a}]:{port}")))
            .collect();
        let mut cmd = Command::new(probe_bin());
        cmd.arg("serve");
        for t in &targets {
            cmd.args(["--listen", t]);
        }
        self.backend_server(&mut cmd, || targets.iter().all(|t| self.node_can_connect(t)))
    }

    /// Whether a plain TCP connect from the node namespace (outside the test cgroup, so
    /// never redirected) succeeds. Runs on a thread of its own that joins the namespace.
    pub fn node_can_connect(&self, target: &str) -> bool {
        let target: std::net::SocketAddr = target.parse().expect("socket address");
        let ns_fd = self.node.file.as_raw_fd();
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this short-lived thread only; the fd outlives the scope.
                if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
                    panic!("setns: {}", std::io::Error::last_os_error());
                }
                std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok()
            })
            .join()
            .expect("connect thread")
        })
    }

    /// Run the probe client in the node namespace and the test cgroup.
    pub fn probe(&self, target: &str, bytes: u64) -> Probe {
        let mut cmd = Command::new(probe_bin());
        cmd.args(["client", "--connect", target, "--bytes", &bytes.to_string()]);
        Probe::from(run(self.in_node(&mut cmd, true), Duration::from_secs(60)))
    }

    /// Run any client command in the node namespace and the test cgroup.
    pub fn client(&self, cmd: &mut Command) -> Output {
        run(self.in_node(cmd, true), Duration::from_secs(60))
    }

    /// Names of the programs attached to the test cgroup, as bpftool reports them.
    pub fn attached_programs(&self) -> Vec<String> {
        attached_programs(&self.cgroup.path)
    }
}

/// Names of the programs attached to `cgroup`, as bpftool reports them.
pub fn attached_programs(cgroup: &Path) -> Vec<String> {
    let out = sh(Command::new("bpftool").args(["cgroup", "show"]).arg(cgroup));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1) // header
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect()
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

fn enter<'c>(cmd: &'c mut Command, netns: &Netns, cgroup: Option<&Cgroup>) -> &'c mut Command {
    let ns_fd = netns.file.as_raw_fd();
    let procs_fd = cgroup.map(|c| c.procs.as_raw_fd());
    // SAFETY: only async-signal-safe calls (write, setns) on fds the parent keeps open
    // until spawn returns; writing "0" to cgroup.procs moves the writer itself.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Run to completion or kill after `limit`; every client in the tests is bounded.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!("{cmd:?} did not finish within {limit:?}; stdout: {}", String::from_utf8_lossy(&out.stdout));
        }
        thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("collect output")
}

/// Poll `f` until it holds or `limit` passes, then panic naming `what`.
pub fn eventually(limit: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// What one probe client run printed.
#[derive(Debug)]
pub struct Probe {
    pub status: ExitStatus,
    pub fields: HashMap<String, String>,
    pub stdout: String,
}

impl Probe {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// Panics with the whole output unless the run succeeded.
    pub fn ok(self) -> Self {
        assert!(self.status.success(), "probe client failed ({}):\n{}", self.status, self.stdout);
        self
    }
}

impl From<Output> for Probe {
    fn from(out: Output) -> Self {
        let stdout = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let fields =
            stdout.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        Self { status: out.status, fields, stdout }
    }
}

/// A running `switchyard run`, in the node namespace and the test cgroup.
pub struct Agent {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
    cgroup: PathBuf,
}

impl Agent {
    /// Write `config` (YAML) and start the agent; returns once it logs that it is ready.
    pub fn start(topo: &Topology, config: &str) -> Self {
        Self::start_bin(&switchyard_bin(), topo, config)
    }

    /// [`Agent::start`] with an explicit binary.
    pub fn start_bin(bin: &Path, topo: &Topology, config: &str) -> Self {
        let path = topo.dir.path().join("switchyard.yaml");
        std::fs::write(&path, config).expect("write config");
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(&path).env("SWITCHYARD_LOG", "info,switchyard=debug");
        let child = topo.in_node(&mut cmd, true).stdout(Stdio::null()).stderr(Stdio::piped()).spawn();
        let mut child = child.expect("spawn switchyard");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut agent = Self { child: Some(child), log, cgroup: topo.cgroup.path.clone() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !agent.log().contains("switchyard ready") {
            let exited = agent.child.as_mut().unwrap().try_wait().expect("wait").is_some();
            assert!(!exited && Instant::now() < deadline, "switchyard did not become ready:\n{}", agent.log());
            thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Send `signal` and wait (bounded) for the process to exit; returns status and log.
    pub fn stop_with(mut self, signal: nix::sys::signal::Signal) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).expect("signal agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("switchyard did not exit after {signal}:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        };
        // Let the reader thread drain the pipe.
        thread::sleep(Duration::from_millis(100));
        (status, self.log())
    }

    /// SIGTERM; require a clean exit that leaves nothing attached to the cgroup.
    pub fn stop(self) -> String {
        let cgroup = self.cgroup.clone();
        let (status, log) = self.stop_with(nix::sys::signal::Signal::SIGTERM);
        assert!(status.success(), "switchyard exited with {status}:\n{log}");
        let left = attached_programs(&cgroup);
        assert!(left.is_empty(), "still attached to {} after a clean stop: {left:?}", cgroup.display());
        log
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The kernel counters the agent logs when it stops (`kernel counters counters=...`).
pub fn kernel_counters(log: &str) -> HashMap<String, u64> {
    let line =
        log.lines().find(|l| l.contains("kernel counters")).unwrap_or_else(|| panic!("no counters in log:\n{log}"));
    // `counters=a=1 b=2 tracked_sockets=0`: every name=value after the first `counters=`.
    let text = line.split_once("counters=").map(|(_, rest)| rest).unwrap_or_default();
    text.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or_else(|_| panic!("bad counter {kv:?}", kv = (k, v)))))
        .collect()
}
