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
