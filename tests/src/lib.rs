//! Harness for the root-only end-to-end tests.
//!
//! Every test builds its own [`Topology`]: a "node" network namespace (where the agent and
//! the clients run, as on a Kubernetes node) joined by a veth pair to a "backend" namespace
//! (where the endpoints listen, as on other hosts), plus a child cgroup of the cgroup v2
//! root that the agent attaches to. Nothing is attached anywhere else, service addresses
//! (10.96.0.0/16, fd96::/64) exist only inside the node namespace, which has no route for
//! them, so a connect that is not redirected fails with ENETUNREACH and never leaves the
//! machine. Each topology also mounts a bpffs instance of its own (in a temporary
//! directory, never /sys/fs/bpf) for the agent's pins, and has its own hand-over socket;
//! [`Topology::node_config`] writes both into every agent config. Guards remove
//! namespaces, pins and cgroups on drop, panics included. [`Topology::pod`] adds pods: a
//! namespace of their own each, routed through the node, in a kubelet-style cgroup below
//! the test cgroup (see [`Pod`]).

pub mod kube_api;

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader},
    net::{IpAddr, SocketAddr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
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
    /// The agent's node addresses (the defaults of `agent.node_address`): on the node's
    /// `lo` while an agent runs, where pods' redirected connects arrive.
    pub const NODE_ADDRESS_V4: &str = "169.254.83.89";
    pub const NODE_ADDRESS_V6: &str = "fd00:5359::1";
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

/// The common start of a test: root check (see [`require_root`]), `hosts` backend hosts
/// each running the probe echo server on port 7000. `None` means skipped.
pub fn echo_hosts(test: &str, hosts: usize) -> Option<(Topology, Vec<Proc>)> {
    if !require_root(test) {
        return None;
    }
    let topo = Topology::with_hosts(hosts);
    let servers = (0..hosts).map(|i| topo.echo_server(i, 7000, 0)).collect();
    Some((topo, servers))
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

/// Another build of the agent, with another version or hand-over protocol (`cargo xtask
/// test` builds them first: `VARIANTS` in xtask): target/variants/switchyard-<name>.
pub fn variant_bin(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../target/variants/switchyard-{name}"));
    assert!(bin.is_file(), "{} does not exist: `cargo xtask test` builds it", bin.display());
    bin
}

/// `redis-server` arguments for a throwaway server on `bind:port`: no snapshots, no
/// append-only file, not in protected mode (clients come from another namespace).
pub fn redis_args(bind: &str, port: u16) -> Vec<String> {
    ["--bind", bind, "--port", &port.to_string(), "--save", "", "--appendonly", "no", "--protected-mode", "no"]
        .map(String::from)
        .into()
}

/// The Python servers and clients of the HTTP tests (tests/servers/backends.py).
pub fn backends_py() -> Command {
    server_py("backends.py")
}

/// `python3 tests/servers/<script>`: the Python servers and clients of the tests.
pub fn server_py(script: &str) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("servers").join(script));
    cmd
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

/// A bpffs instance mounted on a temporary directory: every mount of bpffs is a separate
/// instance, so the pins of a test live and die with it. On drop it is unmounted, which
/// unpins everything in it (detaching any link only a pin held), and the directory goes.
pub struct Bpffs {
    pub mount: PathBuf,
}

impl Bpffs {
    fn new() -> Self {
        let mount = tempfile::Builder::new().prefix("switchyard-bpffs-").tempdir().expect("bpffs mount point").keep();
        sh(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&mount));
        Self { mount }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt as _;
        if let Ok(path) = std::ffi::CString::new(self.mount.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path; MNT_DETACH so a process still holding an
            // fd in it cannot keep the mount (and the test's pins) alive.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.mount);
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
        Self::new_in(&cgroup2_root(), name)
    }

    fn new_in(parent: &Path, name: &str) -> Self {
        let path = parent.join(name);
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

/// Nested cgroups below a test's cgroup, laid out as kubelet lays out a pod's
/// (`kubepods.slice/.../cri-containerd-<id>.scope`): every level is made, and on drop
/// removed innermost first.
pub struct NestedCgroup {
    levels: Vec<Cgroup>,
}

impl NestedCgroup {
    /// The innermost cgroup, where a client runs.
    pub fn leaf(&self) -> &Cgroup {
        self.levels.last().expect("at least one level")
    }
}

impl Drop for NestedCgroup {
    fn drop(&mut self) {
        while let Some(level) = self.levels.pop() {
            drop(level);
        }
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Proc {
    /// Kill it now (SIGKILL, as a crash would) and reap it.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    /// SIGTERM first, so a server with children (nginx's master and its workers) takes
    /// them along: a SIGKILLed master leaves its workers running. SIGKILL after 3 s.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok()
            && wait_bounded(&mut self.0, Duration::from_secs(3)).is_some()
        {
            return;
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node namespace, backend "hosts" each joined to it by a veth pair, and the test's
/// cgroup.
pub struct Topology {
    /// First, so it goes first: pins are removed before the cgroup and namespaces.
    pub bpffs: Bpffs,
    pub node: Netns,
    /// hosts[0] is the backend with the `addr::BACKEND_*` addresses; host i > 0 has
    /// 10.10.i.2 and fd10:i::2 (see [`host_v4`]).
    pub hosts: Vec<Netns>,
    /// The kubelet-style parents of the pods' cgroups, below `cgroup`, made with the first
    /// [`Topology::pod`]; before `cgroup`, so they are removed first.
    pub kubepods: OnceLock<Kubepods>,
    pub cgroup: Cgroup,
    pub dir: tempfile::TempDir,
    /// The last pod index handed out (pod n has 10.244.n.0/24).
    next_pod: AtomicU32,
}

/// nginx `locations` ([`Topology::nginx`]) for soak.py's HTTP clients on host `i`:
/// `/who` answers `host-<i>` (which endpoint answered), `/blob` serves `blob`
/// ([`Topology::blob`]).
pub fn who_and_blob(i: usize, blob: &Path) -> String {
    format!(
        "    location = /who {{ return 200 \"host-{i}\\n\"; }}\n    location = /blob {{ alias {}; }}",
        blob.display()
    )
}

/// IPv4 address of backend host `i`: 10.10.i.2 (host 0 also has 10.10.0.3).
pub fn host_v4(i: usize) -> String {
    format!("10.10.{i}.2")
}

impl Topology {
    /// The node and one backend host.
    pub fn new() -> Self {
        Self::with_hosts(1)
    }

    /// The node and `n` backend hosts, each on its own veth: a fault injected into one
    /// host (black-holing, slowness) touches no other.
    pub fn with_hosts(n: usize) -> Self {
        let id = unique("sy");
        let bpffs = Bpffs::new();
        let node = Netns::new(format!("{id}-node"));
        let hosts: Vec<Netns> = (0..n.max(1)).map(|i| Netns::new(format!("{id}-h{i}"))).collect();
        for (i, host) in hosts.iter().enumerate() {
            let (a, b) = (format!("{id}a{i}"), format!("{id}b{i}"));
            ip(&format!("-n {} link add {a} type veth peer name {b} netns {}", node.name, host.name));
            ip(&format!("-n {} addr add 10.10.{i}.1/24 dev {a}", node.name));
            ip(&format!("-n {} addr add fd10:{i}::1/64 dev {a} nodad", node.name));
            ip(&format!("-n {} link set {a} up", node.name));
            let (v4, v6): (Vec<String>, Vec<String>) = if i == 0 {
                (addr::BACKEND_V4.map(String::from).into(), addr::BACKEND_V6.map(String::from).into())
            } else {
                (vec![host_v4(i)], vec![format!("fd10:{i}::2")])
            };
            for a4 in v4 {
                ip(&format!("-n {} addr add {a4}/24 dev {b}", host.name));
            }
            for a6 in v6 {
                ip(&format!("-n {} addr add {a6}/64 dev {b} nodad", host.name));
            }
            ip(&format!("-n {} link set {b} up", host.name));
        }
        let cgroup = Cgroup::new(&format!("switchyard-test-{id}"));
        let dir = tempfile::Builder::new().prefix("switchyard-test-").tempdir().expect("temp dir");
        Self { bpffs, node, hosts, kubepods: OnceLock::new(), cgroup, dir, next_pod: AtomicU32::new(0) }
    }

    /// The agent's pin directory (`agent.bpffs_dir`) inside this topology's own bpffs.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.mount.join("switchyard")
    }

    /// `switchyard uninstall --bpffs-dir <this topology's pins>`: (succeeded, stdout). Run
    /// in the node namespace (outside the test cgroup), where the agent ran: what it
    /// removes besides pins (the node addresses on `lo`) is per namespace.
    pub fn uninstall(&self) -> (bool, String) {
        let mut cmd = Command::new(switchyard_bin());
        cmd.arg("uninstall").arg("--bpffs-dir").arg(self.pin_dir());
        let out = run(self.in_node(&mut cmd, false), Duration::from_secs(30));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Rewrite the config file the agent was started with ([`Agent::start`] writes it) with
    /// `config`, completed as [`Topology::node_config`] does, so that its agent block is
    /// the running one's and a SIGHUP reloads services only (the plain reload path).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(self.dir.path().join("switchyard.yaml"), self.node_config(config)).expect("write config");
    }

    /// The agent's hand-over socket (`agent.handover_socket`) for this topology's node.
    pub fn handover_socket(&self) -> PathBuf {
        self.dir.path().join("run/handover.sock")
    }

    /// `config` (YAML) with this topology's pin directory and hand-over socket filled in
    /// where it does not set them, so no agent of a test touches the machine's defaults
    /// (/sys/fs/bpf/switchyard, /run/switchyard) or another test's agent.
    pub fn node_config(&self, config: &str) -> String {
        use serde_yaml_ng::{Mapping, Value};
        let mut doc: Value = serde_yaml_ng::from_str(config).expect("test config is YAML");
        if doc.is_null() {
            doc = Value::Mapping(Mapping::new());
        }
        let root = doc.as_mapping_mut().expect("config is a mapping");
        let agent = root.entry("agent".into()).or_insert(Value::Mapping(Mapping::new()));
        if agent.is_null() {
            *agent = Value::Mapping(Mapping::new());
        }
        let agent = agent.as_mapping_mut().expect("agent is a mapping");
        let path = |p: PathBuf| Value::String(p.display().to_string());
        agent.entry("bpffs_dir".into()).or_insert(path(self.pin_dir()));
        agent.entry("handover_socket".into()).or_insert(path(self.handover_socket()));
        serde_yaml_ng::to_string(&doc).expect("serialise config")
    }

    /// The first backend host.
    pub fn backend(&self) -> &Netns {
        &self.hosts[0]
    }

    /// Make backend host `i` drop everything it sends back to the node: its connects from
    /// the node then time out, as with a crashed machine or a partition.
    pub fn blackhole_host(&self, i: usize) {
        ip(&format!("-n {} route add blackhole 10.10.{i}.1/32", self.hosts[i].name));
    }

    /// A cgroup below the test cgroup (so the programs apply to it too): a distinct
    /// client identity for affinity tests.
    pub fn child_cgroup(&self, name: &str) -> Cgroup {
        Cgroup::new_in(&self.cgroup.path, name)
    }

    /// The probe echo server on host `i`, port `port`, greeting after `delay_ms`.
    pub fn echo_server(&self, i: usize, port: u16, delay_ms: u64) -> Proc {
        let target = format!("{}:{port}", host_v4(i));
        let mut cmd = Command::new(probe_bin());
        cmd.args(["serve", "--listen", &target, "--delay-ms", &delay_ms.to_string()]);
        let child = enter(&mut cmd, &self.hosts[i], None).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let proc = Proc(child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")));
        eventually(Duration::from_secs(10), &format!("echo server on {target}"), || self.node_can_connect(&target));
        proc
    }

    /// Start `sy-probe load` against `target` in the test cgroup (or `cgroup`).
    pub fn load(&self, target: &str, args: &[&str], cgroup: Option<&Cgroup>) -> Load {
        let mut cmd = Command::new(probe_bin());
        cmd.args(["load", "--connect", target]).args(args);
        let cmd = enter(&mut cmd, &self.node, Some(cgroup.unwrap_or(&self.cgroup)));
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn load");
        let stdout = read_all(child.stdout.take());
        Load { child: Some(child), stdout: Some(stdout), expect: Load::expected(args) }
    }

    /// Connections open now through the agent (`/conns`, state `open`) to `service`: to
    /// wait until held connections are really open before changing anything.
    pub fn open_conns(&self, service: &str) -> usize {
        self.open_conns_started(service).len()
    }

    /// When each connection open now through the agent to `service` began (ms since the
    /// epoch, the clock of [`epoch_ms`]).
    pub fn open_conns_started(&self, service: &str) -> Vec<u128> {
        let all: serde_json::Value = serde_json::from_str(&self.admin_get("/conns")).expect("/conns is JSON");
        all.as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["state"] == "open" && c["service"] == service)
            .map(|c| c["started_unix_ms"].as_u64().expect("started_unix_ms in /conns") as u128)
            .collect()
    }

    /// Make `cmd` start inside the node namespace, and inside the test cgroup (where the
    /// programs are attached) when `in_cgroup`.
    pub fn in_node<'c>(&self, cmd: &'c mut Command, in_cgroup: bool) -> &'c mut Command {
        enter(cmd, &self.node, in_cgroup.then_some(&self.cgroup))
    }

    /// Make `cmd` start inside backend host `i`.
    pub fn in_host<'c>(&self, i: usize, cmd: &'c mut Command) -> &'c mut Command {
        enter(cmd, &self.hosts[i], None)
    }

    /// Make `cmd` start inside the (first) backend host.
    pub fn in_backend<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        enter(cmd, self.backend(), None)
    }

    /// Start a server in the backend namespace and wait until `ready` says it is up.
    pub fn backend_server(&self, cmd: &mut Command, ready: impl Fn() -> bool) -> Proc {
        let child = self.in_backend(cmd).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let proc = Proc(child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")));
        eventually(Duration::from_secs(10), &format!("{cmd:?} to come up"), ready);
        proc
    }

    /// Start a server in backend host `i` and wait until `target` (its address) accepts
    /// connections from the node.
    pub fn host_server(&self, i: usize, cmd: &mut Command, target: &str) -> Proc {
        let child = self.in_host(i, cmd).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let proc = Proc(child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")));
        eventually(Duration::from_secs(20), &format!("{cmd:?} to listen on {target}"), || {
            self.node_can_connect(target)
        });
        proc
    }

    /// A 64 KiB file of fixed, non-repeating bytes in the topology's directory: what nginx
    /// serves as `/blob` ([`who_and_blob`]) and tests/servers/soak.py (`--blob`) checks
    /// every such response against, byte for byte.
    pub fn blob(&self) -> PathBuf {
        let path = self.dir.path().join("blob.bin");
        let bytes: Vec<u8> = (0..65536u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&path, bytes).expect("write blob.bin");
        path
    }

    /// nginx on backend host `i`, listening on :8080 (HTTP/1.1) and :8081 (h2c) of its
    /// address, its pid, logs and temp files in `dir`: `main` adds top-level directives,
    /// `http` the rest of the `http` block (logs, limits) and `locations` the server's.
    /// Returns once :8080 accepts connections.
    pub fn nginx(&self, i: usize, dir: &Path, main: &str, http: &str, locations: &str) -> Proc {
        std::fs::create_dir_all(dir).expect("nginx dir");
        let (d, ip) = (dir.display(), host_v4(i));
        let conf = format!(
            "user root;\n{main}\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             \x20 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{http}\n\
             \x20 server {{\n    listen {ip}:8080;\n    listen {ip}:8081 http2;\n{locations}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&path).args(["-g", "daemon off;"]);
        self.host_server(i, &mut cmd, &format!("{ip}:8080"))
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

    /// Start a long-running client in the node namespace and the test cgroup.
    pub fn spawn_client(&self, cmd: &mut Command) -> Proc {
        let child = self.in_node(cmd, true).stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
        Proc(child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
    }

    /// Run a command in the node namespace outside the test cgroup (admin API calls,
    /// CLI commands) and return its stdout, panicking on failure.
    pub fn node_output(&self, cmd: &mut Command) -> String {
        let out = run(self.in_node(cmd, false), Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// GET a path of the agent's admin API (127.0.0.1:4191 in the node namespace).
    pub fn admin_get(&self, path: &str) -> String {
        self.node_output(
            Command::new("curl")
                .args(["-sS", "--fail-with-body", "--max-time", "10"])
                .arg(format!("http://127.0.0.1:4191{path}")),
        )
    }

    /// The value of `name{...label...}` in the agent's /metrics, if it is there.
    pub fn metric(&self, name: &str, label: &str) -> Option<f64> {
        let text = self.admin_get("/metrics");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Run any client command in the node namespace and the test cgroup.
    pub fn client(&self, cmd: &mut Command) -> Output {
        run(self.in_node(cmd, true), Duration::from_secs(60))
    }

    /// `relative` (`a/b/c`) made below the test cgroup, level by level.
    pub fn nested_cgroup(&self, relative: &str) -> NestedCgroup {
        let mut levels: Vec<Cgroup> = Vec::new();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            let parent = levels.last().map_or(self.cgroup.path.clone(), |c| c.path.clone());
            levels.push(Cgroup::new_in(&parent, part));
        }
        NestedCgroup { levels }
    }

    /// Run a client command in the node namespace and in `cgroup` (one below the test
    /// cgroup, so still redirected).
    pub fn client_in(&self, cgroup: &Cgroup, cmd: &mut Command) -> Output {
        run(enter(cmd, &self.node, Some(cgroup)), Duration::from_secs(60))
    }

    /// Spawn a client command in the node namespace and in `cgroup`.
    pub fn spawn_client_in(&self, cgroup: &Cgroup, cmd: &mut Command) -> Proc {
        let child = enter(cmd, &self.node, Some(cgroup)).stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
        Proc(child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
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

/// Run to completion or kill after `limit`; every client in the tests is bounded. Output
/// is read while the command runs, so a chatty one cannot block on a full pipe.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let status = wait_bounded(&mut child, limit);
    let (stdout, stderr) = (stdout.join().expect("stdout"), stderr.join().expect("stderr"));
    let status = status.unwrap_or_else(|| {
        panic!("{cmd:?} did not finish within {limit:?}; stdout: {}", String::from_utf8_lossy(&stdout))
    });
    Output { status, stdout, stderr }
}

fn read_all(pipe: Option<impl std::io::Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Wait for `child` up to `limit`; past it, kill it (it is ours) and return None.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Poll `f` until it holds or `limit` passes, then panic naming `what`.
pub fn eventually(limit: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// Poll `f` until it gives a value or `limit` passes, then panic naming `what`.
pub fn eventually_some<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        thread::sleep(Duration::from_millis(25));
    }
}

/// A running `sy-probe load`, killed on drop. Its output is collected as it comes (a
/// run prints a line per connection, more than a pipe holds).
pub struct Load {
    child: Option<Child>,
    stdout: Option<thread::JoinHandle<Vec<u8>>>,
    /// `--conns N` without `--duration-ms`: exactly N connections must be reported, so
    /// a check over them cannot pass on an empty (or cut short) run.
    expect: Option<usize>,
}

/// One connection of a load run.
#[derive(Debug, Clone)]
pub struct Conn {
    pub start_ms: u128,
    pub end_ms: u128,
    /// The endpoint that answered, or the error.
    pub outcome: Result<String, String>,
}

impl Load {
    /// Wait (bounded) for the run to end and parse its lines.
    pub fn wait(mut self) -> Vec<Conn> {
        let mut child = self.child.take().expect("running");
        let status = wait_bounded(&mut child, Duration::from_secs(120)).expect("load finishes within 120 s");
        let text =
            String::from_utf8_lossy(&self.stdout.take().expect("reader").join().expect("load output")).into_owned();
        assert!(status.success(), "load failed ({status}): {text}");
        let conns = parse_conns(&text);
        let summary = format!(
            "ok={} failed={}",
            conns.iter().filter(|c| c.outcome.is_ok()).count(),
            conns.iter().filter(|c| c.outcome.is_err()).count()
        );
        assert!(text.lines().any(|l| l == summary), "every connection of the load parsed ({summary}): {text}");
        if let Some(n) = self.expect {
            assert_eq!(conns.len(), n, "a load of --conns {n} reported {} connections: {text}", conns.len());
        }
        conns
    }

    /// The count a run of `args` must report, when it is fixed (see `expect`).
    fn expected(args: &[&str]) -> Option<usize> {
        if args.contains(&"--duration-ms") {
            return None;
        }
        let n = args.windows(2).find(|w| w[0] == "--conns").map_or(Some(100), |w| w[1].parse().ok())?;
        Some(n)
    }
}

/// The `conn <start_ms> <end_ms> ok <endpoint>` / `... fail - <error>` lines of a load.
fn parse_conns(text: &str) -> Vec<Conn> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(6, ' ');
            (f.next()? == "conn").then_some(())?;
            let (start_ms, end_ms) = (f.next()?.parse().ok()?, f.next()?.parse().ok()?);
            let ok = f.next()? == "ok";
            let endpoint = f.next()?.to_owned();
            let outcome = if ok { Ok(endpoint) } else { Err(f.next().unwrap_or("").to_owned()) };
            Some(Conn { start_ms, end_ms, outcome })
        })
        .collect()
}

impl Load {
    /// Stop the run now (it is ours) and parse what it printed: for a load kept up for as
    /// long as something else takes. A connection under way when it stops is not counted.
    pub fn stop(mut self) -> Vec<Conn> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let text =
            String::from_utf8_lossy(&self.stdout.take().expect("reader").join().expect("load output")).into_owned();
        parse_conns(&text)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A lifecycle event: when it began and when it was complete (process reaped, new agent
/// ready...), in the load's clock (ms since the epoch).
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub name: &'static str,
    pub begin: u128,
    pub done: u128,
}

/// What happened to connections around one event.
#[derive(Debug)]
pub struct Figures {
    /// Connections established before the event began and still open then, and those of
    /// them that failed (cut).
    pub in_flight: usize,
    pub cut: Vec<Conn>,
    /// Connections begun while the event was under way, and those that failed.
    pub during: usize,
    pub failed_during: Vec<Conn>,
    /// Connections begun after the event completed (until the next event), and those
    /// that failed.
    pub new: usize,
    pub failed_new: Vec<Conn>,
}

pub fn figures(conns: &[Conn], event: Event, until: u128) -> Figures {
    let pick = |keep: &dyn Fn(&Conn) -> bool| -> (usize, Vec<Conn>) {
        let all: Vec<&Conn> = conns.iter().filter(|c| keep(c)).collect();
        (all.len(), all.into_iter().filter(|c| c.outcome.is_err()).cloned().collect())
    };
    let (in_flight, cut) = pick(&|c| c.start_ms < event.begin && c.end_ms >= event.begin);
    let (during, failed_during) = pick(&|c| c.start_ms >= event.begin && c.start_ms < event.done);
    let (new, failed_new) = pick(&|c| c.start_ms >= event.done && c.start_ms < until);
    Figures { in_flight, cut, during, failed_during, new, failed_new }
}

/// Milliseconds since the Unix epoch, the clock `sy-probe load` stamps connections with.
pub fn epoch_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Share of successful connections per endpoint.
pub fn shares(conns: &[Conn]) -> HashMap<String, f64> {
    let ok: Vec<&String> = conns.iter().filter_map(|c| c.outcome.as_ref().ok()).collect();
    let mut out = HashMap::new();
    for e in &ok {
        *out.entry((*e).clone()).or_insert(0.0) += 1.0 / ok.len() as f64;
    }
    out
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
    /// Copies the agent's stderr into `log`; done at the pipe's EOF, once it exited.
    reader: Option<thread::JoinHandle<()>>,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    /// The node namespace's name, for the node addresses on its `lo`.
    node: String,
}

impl Agent {
    /// Write `config` (YAML) and start the agent; returns once it logs that it is ready.
    pub fn start(topo: &Topology, config: &str) -> Self {
        Self::start_bin(&switchyard_bin(), topo, config)
    }

    /// [`Agent::start`] with extra environment (for example a JSON log format).
    pub fn start_env(topo: &Topology, config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(&switchyard_bin(), topo, config, env)
    }

    /// [`Agent::start`] with an explicit binary.
    pub fn start_bin(bin: &Path, topo: &Topology, config: &str) -> Self {
        Self::start_with(bin, topo, config, &[])
    }

    /// [`Agent::start`] with an explicit binary and extra environment. The config gets the
    /// topology's pin directory and hand-over socket (see [`Topology::node_config`]), so a
    /// second agent started on the same topology takes over from the first.
    pub fn start_with(bin: &Path, topo: &Topology, config: &str, env: &[(&str, &str)]) -> Self {
        Self::try_start_with(bin, topo, config, env, Duration::from_secs(30))
            .unwrap_or_else(|log| panic!("switchyard did not become ready:\n{log}"))
    }

    /// [`Agent::start_with`], waiting up to `limit` for it to be ready. An agent that
    /// exits or is not ready in time is killed, and its log returned: for the scale
    /// benchmark, where "not ready after two minutes" is a result, not a failure.
    pub fn try_start_with(
        bin: &Path,
        topo: &Topology,
        config: &str,
        env: &[(&str, &str)],
        limit: Duration,
    ) -> Result<Self, String> {
        let path = topo.dir.path().join("switchyard.yaml");
        std::fs::write(&path, topo.node_config(config)).expect("write config");
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .env("SWITCHYARD_LOG", "info,switchyard=debug")
            .envs(env.iter().copied());
        let child = topo.in_node(&mut cmd, true).stdout(Stdio::null()).stderr(Stdio::piped()).spawn();
        let mut child = child.expect("spawn switchyard");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut agent = Self {
            child: Some(child),
            log,
            reader: Some(reader),
            cgroup: topo.cgroup.path.clone(),
            pin_dir: topo.pin_dir(),
            node: topo.node.name.clone(),
        };
        let deadline = Instant::now() + limit;
        // Only the new part of the log each time: a large cluster's start-up logs a lot.
        let mut seen = 0;
        loop {
            let tail = agent.log_since(seen);
            if tail.contains("switchyard ready") {
                return Ok(agent);
            }
            // Keep a partial line's start for the next look.
            seen += tail.rfind('\n').map_or(0, |i| i + 1);
            let exited = agent.child.as_mut().unwrap().try_wait().expect("wait").is_some();
            if exited || Instant::now() >= deadline {
                agent.kill();
                // Its last lines may still be in the pipe: read to the end first.
                if let Some(reader) = agent.reader.take() {
                    let _ = reader.join();
                }
                return Err(agent.log());
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// How long the log is now: an offset for [`Agent::log_since`].
    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The log from `offset` (a value of [`Agent::log_len`]) on: watching for a line
    /// without copying a long log each time.
    pub fn log_since(&self, offset: usize) -> String {
        self.log.lock().unwrap().get(offset..).unwrap_or_default().to_owned()
    }

    /// SIGKILL, as a crash or the OOM killer would, and reap it. Pins stay behind.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Send `signal` and wait (bounded) for the process to exit; returns status and log.
    pub fn stop_with(mut self, signal: nix::sys::signal::Signal) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).expect("signal agent");
        let status = wait_bounded(&mut child, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("switchyard did not exit after {signal}:\n{}", self.log()));
        self.drain_log();
        (status, self.log())
    }

    /// SIGTERM; require a clean exit that leaves nothing attached to the cgroup, no pin
    /// directory and no address but the loopback ones on the node's `lo`.
    pub fn stop(self) -> String {
        let (cgroup, pin_dir, node) = (self.cgroup.clone(), self.pin_dir.clone(), self.node.clone());
        let (status, log) = self.stop_with(nix::sys::signal::Signal::SIGTERM);
        assert!(status.success(), "switchyard exited with {status}:\n{log}");
        let left = attached_programs(&cgroup);
        assert!(left.is_empty(), "still attached to {} after a clean stop: {left:?}", cgroup.display());
        assert!(!pin_dir.exists(), "{} still exists after a clean stop:\n{log}", pin_dir.display());
        let left = node_addresses_on_lo(&node);
        assert!(left.is_empty(), "node addresses still on lo of {node} after a clean stop: {left:?}\n{log}");
        log
    }

    /// Wait (bounded) for the agent to exit by itself (after handing over); returns
    /// status and log.
    pub fn wait_exit(mut self, limit: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let status = wait_bounded(&mut child, limit)
            .unwrap_or_else(|| panic!("switchyard did not exit within {limit:?}:\n{}", self.log()));
        self.drain_log();
        (status, self.log())
    }

    /// After the process exited: wait (bounded) until its whole stderr is in the log,
    /// that is until the reader thread met the pipe's end.
    fn drain_log(&mut self) {
        let Some(reader) = self.reader.take() else { return };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "the agent's stderr stayed open 5 s after it exited");
            thread::sleep(Duration::from_millis(5));
        }
        reader.join().expect("log reader");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if thread::panicking() {
            // The agent's side of a failed test.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- switchyard log (last {} lines) ---", tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
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

/// Ids of the kernel objects behind the programs attached to a cgroup: the programs, the
/// maps they use and their links. Taken while an agent runs, so that after removal the
/// test can check that none of these is left, whatever other tests load meanwhile.
#[derive(Debug, Default, Clone)]
pub struct KernelObjects {
    pub progs: Vec<u64>,
    pub maps: Vec<u64>,
    pub links: Vec<u64>,
}

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = sh(Command::new("bpftool").arg("-j").args(args));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool {args:?}: {e}"))
}

fn ids(list: &serde_json::Value, keep: impl Fn(&serde_json::Value) -> bool) -> Vec<u64> {
    list.as_array().into_iter().flatten().filter(|o| keep(o)).filter_map(|o| o["id"].as_u64()).collect()
}

impl KernelObjects {
    /// What bpftool reports for the programs attached to `cgroup`.
    pub fn attached_to(cgroup: &Path) -> Self {
        let progs = ids(&bpftool_json(&["cgroup", "show", &cgroup.display().to_string()]), |_| true);
        let mut maps: Vec<u64> = progs
            .iter()
            .flat_map(|id| {
                let prog = bpftool_json(&["prog", "show", "id", &id.to_string()]);
                prog["map_ids"].as_array().cloned().unwrap_or_default().into_iter().filter_map(|m| m.as_u64())
            })
            .collect();
        maps.sort();
        maps.dedup();
        let links =
            ids(&bpftool_json(&["link", "show"]), |l| l["prog_id"].as_u64().is_some_and(|p| progs.contains(&p)));
        Self { progs, maps, links }
    }

    /// Those of `self` that bpftool still lists (programs and maps by our name prefixes,
    /// links by id), as "kind id name" lines.
    pub fn still_loaded(&self) -> Vec<String> {
        let mut left = Vec::new();
        let mut check = |kind: &str, list: serde_json::Value, mine: &[u64], prefix: Option<&str>| {
            for o in list.as_array().into_iter().flatten() {
                let (id, name) = (o["id"].as_u64().unwrap_or(0), o["name"].as_str().unwrap_or(""));
                let named_ours = prefix.is_none_or(|p| name.starts_with(p));
                if named_ours && mine.contains(&id) {
                    left.push(format!("{kind} {id} {name}"));
                }
            }
        };
        check("prog", bpftool_json(&["prog", "show"]), &self.progs, Some("sy_"));
        check("map", bpftool_json(&["map", "show"]), &self.maps, Some("SY_"));
        check("link", bpftool_json(&["link", "show"]), &self.links, None);
        left
    }
}

// Pods: network namespaces of their own on the node, as a CNI plugin makes them.

/// kubelet's parents of every pod cgroup under the cgroupfs driver: `kubepods` and its
/// `burstable` QoS class. The inner one first, so it is removed first.
pub struct Kubepods {
    pub burstable: Cgroup,
    pub kubepods: Cgroup,
}

/// A pod on the node: a network namespace of its own joined to the node's by a veth pair
/// (node side 10.244.n.1/24 and fd44:n::1/64, pod side 10.244.n.2 and fd44:n::2, default
/// routes through the node, which forwards), and a container cgroup laid out as kubelet's
/// cgroupfs driver does, `kubepods/burstable/pod<uid>/<container id>`, below the test
/// cgroup, so the agent's programs apply to it. The pod's clients run in both.
///
/// A pod reaches the backend hosts through the node (the in-kernel fallback sends it
/// there); it reaches service addresses only when its connect is rewritten: the node has
/// no route for them and answers ENETUNREACH. Dropping the pod kills its processes and
/// removes its cgroups and namespace (with the veth pair and any nft rules in it).
pub struct Pod<'t> {
    topo: &'t Topology,
    pub name: String,
    /// n of 10.244.n.0/24 and fd44:n::/64, from 1.
    pub index: u32,
    /// Where the pod's clients run; first, so its processes are killed first.
    pub container: Cgroup,
    /// The pod-level cgroup (`.../pod<uid>`), the parent of `container`.
    pub pod_cgroup: Cgroup,
    pub netns: Netns,
    /// The pod's addresses, 10.244.n.2 and fd44:n::2.
    pub v4: String,
    pub v6: String,
}

/// `len` hex digits that differ between calls and runs (std's hasher keys are random per
/// process), for pod uids and container ids.
fn random_hex(len: usize) -> String {
    use std::hash::{BuildHasher, RandomState};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let state = RandomState::new();
    let mut out = String::new();
    while out.len() < len {
        out.push_str(&format!("{:016x}", state.hash_one((NEXT.fetch_add(1, Ordering::Relaxed), epoch_ms()))));
    }
    out.truncate(len);
    out
}

/// Run `f` on a thread of its own that has joined `netns` (setns is per thread; the test's
/// threads stay where they are). A panic in `f` is the caller's.
/// Run `f` on a thread inside `netns` (sockets it makes live there).
pub fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let fd = netns.file.as_raw_fd();
    thread::scope(|s| {
        let joined = s.spawn(move || {
            // SAFETY: setns on this short-lived thread only; the fd outlives the scope.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                panic!("setns: {}", std::io::Error::last_os_error());
            }
            f()
        });
        joined.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// GET `path` of the agent's admin API (127.0.0.1:4191) from a thread already in the node's
/// namespace (see [`in_netns`]): (status, body). Unlike [`Topology::admin_get`], no process
/// per request and no panic on an error status: for loops that poll.
pub fn admin_request(path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", 4191))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Write a sysctl of `netns` (/proc/sys/net is per namespace, as seen by the writing
/// thread; unlike `ip netns exec`, nothing is remounted).
pub fn sysctl(netns: &Netns, key: &str, value: &str) {
    in_netns(netns, || {
        let path = format!("/proc/sys/{key}");
        std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {value} to {path} in {}: {e}", netns.name));
    })
}

/// The cookie the kernel gives a network namespace (SO_NETNS_COOKIE of a socket made in
/// it): what `bpf_get_netns_cookie` returns to the programs, and what the agent reports.
pub fn netns_cookie(netns: &Netns) -> u64 {
    in_netns(netns, || {
        // SO_NETNS_COOKIE from asm-generic/socket.h (Linux 5.14+).
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket in the namespace");
        let (mut cookie, mut len) = (0u64, std::mem::size_of::<u64>() as libc::socklen_t);
        // SAFETY: valid fd, buffer and length for a u64 option.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_NETNS_COOKIE: {}", std::io::Error::last_os_error());
        cookie
    })
}

/// Addresses on `lo` of namespace `netns` other than 127.0.0.1 and ::1 (a fresh
/// namespace has only those): the agent's node addresses while it runs.
pub fn node_addresses_on_lo(netns: &str) -> Vec<String> {
    let out = sh(Command::new("ip").args(["-n", netns, "-j", "addr", "show", "dev", "lo"]));
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j addr is JSON");
    links
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_owned))
        .filter(|a| a != "127.0.0.1" && a != "::1")
        .collect()
}

/// A cgroup's path as the agent shows it (`/conns`, close lines): below the cgroup2 root.
pub fn cgroup_relative(path: &Path) -> String {
    let below = path.strip_prefix(cgroup2_root()).expect("a cgroup below the cgroup2 root");
    format!("/{}", below.display())
}

/// The client address of every `connection closed` line in `log` (text format) of a
/// connection the agent accepted (`via=Agent`; those the kernel sent straight to an
/// endpoint are logged too, `via=Kernel`). v4-mapped addresses are given as v4.
pub fn closed_conn_clients(log: &str) -> Vec<IpAddr> {
    log.lines()
        .filter(|l| l.contains("switchyard::conn") && l.contains("connection closed") && l.contains("via=Agent"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("client.addr=")))
        .filter_map(|a| a.trim_matches('"').parse::<SocketAddr>().ok())
        .map(|a| a.ip().to_canonical())
        .collect()
}

impl Topology {
    /// A new pod on the node (see [`Pod`]). The first one also turns on forwarding in the
    /// node namespace and gives every backend host a route back to the pods
    /// (10.244.0.0/16 via 10.10.i.1, fd44::/16 via fd10:i::1), so that a pod connect the
    /// kernel sends straight to an endpoint works.
    pub fn pod(&self, name: &str) -> Pod<'_> {
        let n = self.next_pod.fetch_add(1, Ordering::Relaxed) + 1;
        assert!(n < 256, "at most 255 pods per topology");
        let id = self.node.name.strip_suffix("-node").expect("the node namespace is named {id}-node");
        let netns = Netns::new(format!("{id}-p{n}"));
        let (node, pod) = (&self.node.name, &netns.name);
        // Interface names stay within IFNAMSIZ: the id is about 9 characters.
        let (node_if, pod_if) = (format!("{id}p{n}"), format!("{id}q{n}"));
        ip(&format!("-n {node} link add {node_if} type veth peer name {pod_if} netns {pod}"));
        ip(&format!("-n {node} link set {node_if} up"));
        ip(&format!("-n {pod} link set {pod_if} up"));
        ip(&format!("-n {node} addr add 10.244.{n}.1/24 dev {node_if}"));
        ip(&format!("-n {node} addr add fd44:{n}::1/64 dev {node_if} nodad"));
        let (v4, v6) = (format!("10.244.{n}.2"), format!("fd44:{n}::2"));
        ip(&format!("-n {pod} addr add {v4}/24 dev {pod_if}"));
        ip(&format!("-n {pod} addr add {v6}/64 dev {pod_if} nodad"));
        ip(&format!("-n {pod} route add default via 10.244.{n}.1"));
        ip(&format!("-n {pod} -6 route add default via fd44:{n}::1"));
        // Every time, not once: a setting made for the first veth must cover this one too.
        sysctl(&self.node, "net/ipv4/ip_forward", "1");
        sysctl(&self.node, "net/ipv6/conf/all/forwarding", "1");
        // The node answers an unrouted pod connect (a service address not redirected) with
        // ICMP unreachable; rate-limited, later ones would hang until their timeout.
        sysctl(&self.node, "net/ipv4/icmp_ratelimit", "0");
        sysctl(&self.node, "net/ipv6/icmp/ratelimit", "0");
        for (i, host) in self.hosts.iter().enumerate() {
            ip(&format!("-n {} route replace 10.244.0.0/16 via 10.10.{i}.1", host.name));
            ip(&format!("-n {} -6 route replace fd44::/16 via fd10:{i}::1", host.name));
        }
        let kube = self.kubepods.get_or_init(|| {
            let kubepods = Cgroup::new_in(&self.cgroup.path, "kubepods");
            Kubepods { burstable: Cgroup::new_in(&kubepods.path, "burstable"), kubepods }
        });
        let h = random_hex(32);
        let uid = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);
        let pod_cgroup = Cgroup::new_in(&kube.burstable.path, &format!("pod{uid}"));
        let container = Cgroup::new_in(&pod_cgroup.path, &random_hex(64));
        Pod { topo: self, name: name.to_owned(), index: n, container, pod_cgroup, netns, v4, v6 }
    }

    /// The node namespace's cookie (see [`netns_cookie`]): the agent's own.
    pub fn node_netns_cookie(&self) -> u64 {
        netns_cookie(&self.node)
    }

    /// Addresses on the node's `lo` besides the loopback ones (see
    /// [`node_addresses_on_lo`]).
    pub fn node_addresses_on_lo(&self) -> Vec<String> {
        node_addresses_on_lo(&self.node.name)
    }

    /// [`Topology::admin_get`], parsed as JSON.
    pub fn admin_json(&self, path: &str) -> serde_json::Value {
        let body = self.admin_get(path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}): {body}"))
    }
}

impl Pod<'_> {
    /// Make `cmd` start inside the pod: its network namespace and its container cgroup.
    pub fn in_pod<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        enter(cmd, &self.netns, Some(&self.container))
    }

    /// Run the probe client in the pod.
    pub fn probe(&self, target: &str, bytes: u64) -> Probe {
        let mut cmd = Command::new(probe_bin());
        cmd.args(["client", "--connect", target, "--bytes", &bytes.to_string()]);
        Probe::from(run(self.in_pod(&mut cmd), Duration::from_secs(60)))
    }

    /// Start `sy-probe load` against `target` in the pod.
    pub fn load(&self, target: &str, args: &[&str]) -> Load {
        let mut cmd = Command::new(probe_bin());
        cmd.args(["load", "--connect", target]).args(args);
        let mut child =
            self.in_pod(&mut cmd).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn load");
        let stdout = read_all(child.stdout.take());
        Load { child: Some(child), stdout: Some(stdout), expect: Load::expected(args) }
    }

    /// Start a long-running client in the pod.
    pub fn spawn_client(&self, cmd: &mut Command) -> Proc {
        let child = self.in_pod(cmd).stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
        Proc(child.unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
    }

    /// Run any client command in the pod.
    pub fn client(&self, cmd: &mut Command) -> Output {
        run(self.in_pod(cmd), Duration::from_secs(60))
    }

    /// Whether a plain TCP connect from the pod's namespace, outside its cgroups (so never
    /// rewritten), succeeds within 2 s.
    pub fn can_connect(&self, target: &str) -> bool {
        let target: SocketAddr = target.parse().expect("socket address");
        in_netns(&self.netns, || std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok())
    }

    /// The pod's network namespace cookie (see [`netns_cookie`]).
    pub fn netns_cookie(&self) -> u64 {
        netns_cookie(&self.netns)
    }

    /// The container cgroup as the agent shows it (below the cgroup2 root).
    pub fn container_cgroup(&self) -> String {
        cgroup_relative(&self.container.path)
    }

    /// Drop, silently, every packet the pod sends to the node addresses
    /// ([`addr::NODE_ADDRESS_V4`], [`addr::NODE_ADDRESS_V6`]): an nft output-hook rule in
    /// the pod's namespace, as a network policy or a broken CNI would do. A connect the
    /// kernel sends to the agent then hangs in SYN retransmits; everything else flows.
    pub fn block_node_address(&self) {
        require_tools(&["nft"]);
        let rules = self.topo.dir.path().join(format!("block-{}.nft", self.netns.name));
        let text = format!(
            "table inet switchyard_test_block {{\n  chain output {{\n    type filter hook output priority 0; policy accept;\n    ip daddr {} drop\n    ip6 daddr {} drop\n  }}\n}}\n",
            addr::NODE_ADDRESS_V4,
            addr::NODE_ADDRESS_V6
        );
        std::fs::write(&rules, text).expect("write nft rules");
        sh(enter(Command::new("nft").arg("-f").arg(&rules), &self.netns, None));
    }

    /// Undo [`Pod::block_node_address`].
    pub fn unblock_node_address(&self) {
        sh(enter(Command::new("nft").args(["delete", "table", "inet", "switchyard_test_block"]), &self.netns, None));
    }

    /// How many `connection closed` lines of `log` are of connections from this pod (its
    /// v4 or v6 address): connections the agent accepted from it.
    pub fn closed_conns(&self, log: &str) -> usize {
        let mine: [IpAddr; 2] = [self.v4.parse().expect("v4"), self.v6.parse().expect("v6")];
        closed_conn_clients(log).iter().filter(|a| mine.contains(a)).count()
    }
}
