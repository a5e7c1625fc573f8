//! `switchyard`: the command line. Everything else lives in the library (see lib.rs).

use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "Transparent node agent for service-to-service traffic")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the redirect and proxy connections to services until SIGINT/SIGTERM.
    Run {
        /// YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit (0 when valid).
    Check {
        /// YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show how a service (by name or address) resolves, down to endpoint health, from
    /// the running agent.
    Resolve {
        /// Service name, or an address applications dial (ip:port).
        target: String,
        /// The agent's admin API.
        #[arg(long, default_value = "127.0.0.1:4191")]
        admin: std::net::SocketAddr,
        /// Print JSON instead of a tree.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => switchyard::app::check(&config).map(|summary| println!("{summary}")),
        Command::Run { config } => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(switchyard::app::run(&config))),
        Command::Resolve { target, admin, json } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(switchyard::app::resolve(&target, admin, json)))
            .map(|out| println!("{out}")),
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
