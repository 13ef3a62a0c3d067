//! The `ringway` command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringway: a thread-per-core HTTP reverse proxy for edge nodes.
///
/// Each core runs a pinned worker on io_uring with its own listener and upstream pools. Routes
/// map host names to upstream addresses and come from a TOML file (watched and reloaded
/// without a restart). Logs go to stderr (level from RUST_LOG, default info); /metrics,
/// /healthz and /readyz are served on the admin listener.
#[derive(Debug, Parser)]
#[command(name = "ringway", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy until SIGTERM or SIGINT (then drain in-flight requests and exit 0).
    Serve {
        /// Config file (TOML). Every key is documented in docs/configuration.md.
        #[arg(long, short, default_value = "examples/ringway.toml")]
        config: PathBuf,
    },
    /// Check a config file and the routes file it names; exit 0 if both are valid.
    CheckConfig {
        /// Config file (TOML).
        config: PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check(config),
    };
    if let Err(e) = result {
        eprintln!("ringway: {e:#}");
        std::process::exit(1);
    }
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let (config, base) = ringway::load_config(&path)?;
    let running = ringway::start(
        config,
        &base,
        ringway::Options {
            handle_signals: true,
        },
    )?;
    running.wait();
    tracing::info!("stopped");
    Ok(())
}

fn check(path: PathBuf) -> anyhow::Result<()> {
    let (config, base) = ringway::load_config(&path)?;
    let routes_path = ringway::resolve(&base, &config.routes.file);
    let set = ringway_control::file_store::load_routes_file(&routes_path)
        .with_context(|| format!("routes file {}", routes_path.display()))?;
    println!(
        "{}: ok ({} host patterns{}, routes from {})",
        path.display(),
        set.hosts.len(),
        if set.default.is_some() {
            ", default route"
        } else {
            ""
        },
        routes_path.display()
    );
    Ok(())
}
