//! `switchyard`: the command line. Everything else lives in the library (see lib.rs).

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::{EnvFilter, Layer as _, fmt, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _};

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Transparent node agent for service-to-service traffic")]
struct Cli {
    /// Log lines as text, or as one JSON object per line (for log pipelines).
    #[arg(long, global = true, value_enum, default_value = "text", env = "SWITCHYARD_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the redirect and proxy connections to services until SIGINT/SIGTERM.
    Run {
        /// YAML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Proxy worker threads (default: one per CPU).
        #[arg(long, env = "SWITCHYARD_WORKERS")]
        workers: Option<usize>,
    },
    /// Detach every program and remove every pin (maps, links, the directory): nothing of
    /// switchyard's stays in the kernel. A running agent keeps proxying what it already
    /// accepted but catches nothing new; stop it with SIGTERM instead to do both.
    Uninstall {
        /// Take the pin directory from this config file (agent.bpffs_dir).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The pin directory (default: agent.bpffs_dir of --config, else /sys/fs/bpf/switchyard).
        #[arg(long)]
        bpffs_dir: Option<PathBuf>,
    },
    /// Validate a config file and exit (0 when valid).
    Check {
        /// YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List live connections (from the running agent).
    Conns {
        /// Only connections to this service.
        #[arg(long)]
        service: Option<String>,
        /// Only connections to this endpoint (ip:port).
        #[arg(long)]
        endpoint: Option<String>,
        /// Only connections from this client: pid, command, part of its cgroup path, or
        /// the start of its workload or pod name (`shop/`).
        #[arg(long)]
        client: Option<String>,
        #[command(flatten)]
        admin: AdminApi,
        #[arg(long)]
        json: bool,
    },
    /// List services with endpoint health and connection counts.
    Services {
        /// Only services whose names start with this (`shop/`: a namespace's).
        prefix: Option<String>,
        #[command(flatten)]
        admin: AdminApi,
        #[arg(long)]
        json: bool,
    },
    /// Live view of connections sorted by traffic, refreshed every interval.
    Top {
        #[command(flatten)]
        admin: AdminApi,
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many refreshes (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
    },
    /// Golden signals (requests, success rate, latency percentiles, connections, bytes)
    /// by service, client workload, route (workload -> service) or endpoint.
    Stat {
        /// services, workloads, routes or endpoints.
        #[arg(default_value = "services")]
        by: String,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// Only this client workload (`namespace/kind/name` or `kind/name`).
        #[arg(long)]
        workload: Option<String>,
        /// Rates over this many seconds (at most 60).
        #[arg(long, default_value_t = 60)]
        window: u64,
        #[command(flatten)]
        admin: AdminApi,
        #[arg(long)]
        json: bool,
    },
    /// Who talks to whom right now: client workload -> service -> endpoint, with rates.
    Edges {
        #[arg(long, default_value_t = 60)]
        window: u64,
        #[command(flatten)]
        admin: AdminApi,
        #[arg(long)]
        json: bool,
    },
    /// Watch requests (and opaque connections) as they happen.
    Tap {
        #[arg(long)]
        service: Option<String>,
        /// Client workload, or a prefix of it (`shop/` for a namespace).
        #[arg(long)]
        workload: Option<String>,
        /// Request path prefix.
        #[arg(long)]
        path: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<u64>,
        /// Stop after this many seconds (at most 600).
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        #[command(flatten)]
        admin: AdminApi,
        /// Print each event as its JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Show how a service (by name or address) resolves, down to endpoint health, from
    /// the running agent.
    Resolve {
        /// Service name, or an address applications dial (ip:port).
        target: String,
        #[command(flatten)]
        admin: AdminApi,
        /// Print JSON instead of a tree.
        #[arg(long)]
        json: bool,
    },
}

/// Where the running agent's admin API listens, for the commands that read it.
#[derive(clap::Args)]
struct AdminApi {
    /// The agent's admin API (`agent.admin` of its config).
    #[arg(long = "admin", value_name = "ADDR", default_value = "127.0.0.1:4191")]
    addr: std::net::SocketAddr,
}

/// Install logging; returns the control the admin API uses to change the filter.
fn init_logging(format: LogFormat) -> switchyard::admin::LogControl {
    let initial = std::env::var("SWITCHYARD_LOG").unwrap_or_else(|_| "info".into());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = match format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => fmt::layer().json().flatten_event(true).with_writer(std::io::stderr).boxed(),
    };
    tracing_subscriber::registry().with(filter).with(fmt).init();
    let current = std::sync::Mutex::new(initial);
    std::sync::Arc::new(move |new: Option<&str>| {
        let mut current = current.lock().unwrap();
        if let Some(spec) = new {
            let filter = EnvFilter::try_new(spec).map_err(|e| format!("`{spec}` is not a log filter: {e}"))?;
            handle.reload(filter).map_err(|e| e.to_string())?;
            tracing::info!(filter = spec, "log filter changed");
            *current = spec.to_owned();
        }
        Ok(current.clone())
    })
}

/// Run one admin API client command on a small runtime.
fn client<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(fut)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log = init_logging(cli.log_format);
    let result = match cli.command {
        Command::Uninstall { config, bpffs_dir } => {
            switchyard::app::uninstall(config.as_deref(), bpffs_dir.as_deref()).map(|summary| println!("{summary}"))
        }
        Command::Check { config } => switchyard::app::check(&config).map(|summary| println!("{summary}")),
        Command::Run { config, workers } => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = workers {
                rt.worker_threads(n.max(1));
            }
            rt.enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(switchyard::app::run(&config, log)))
        }
        Command::Resolve { target, admin: AdminApi { addr: admin }, json } => {
            client(switchyard::cli::resolve(admin, &target, json)).map(|out| println!("{out}"))
        }
        Command::Conns { service, endpoint, client: who, admin: AdminApi { addr: admin }, json } => {
            let filters = [("service", service), ("endpoint", endpoint), ("client", who)];
            client(switchyard::cli::conns(admin, &filters, json)).map(|out| println!("{out}"))
        }
        Command::Services { prefix, admin: AdminApi { addr: admin }, json } => {
            client(switchyard::cli::services(admin, prefix.as_deref(), json)).map(|out| println!("{out}"))
        }
        Command::Stat { by, service, workload, window, admin: AdminApi { addr: admin }, json } => {
            let filters = [("service", service), ("workload", workload)];
            client(switchyard::cli::stat(admin, &by, &filters, window, json)).map(|out| println!("{out}"))
        }
        Command::Edges { window, admin: AdminApi { addr: admin }, json } => {
            client(switchyard::cli::edges(admin, window, json)).map(|out| println!("{out}"))
        }
        Command::Tap { service, workload, path, limit, seconds, admin: AdminApi { addr: admin }, json } => {
            let filters = [("service", service), ("workload", workload), ("path", path)];
            client(switchyard::cli::tap(admin, &filters, limit, seconds, json))
        }
        Command::Top { admin: AdminApi { addr: admin }, interval_ms, iterations } => {
            client(switchyard::cli::top(admin, std::time::Duration::from_millis(interval_ms.max(100)), iterations))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // {:#} prints the whole cause chain on one line: "what we did: why".
            eprintln!("switchyard: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
