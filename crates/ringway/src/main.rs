//! The `ringway` command.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the calling thread's free mimalloc pages to the system. mimalloc purges freed pages
/// only while the thread keeps allocating, so a worker that went quiet after a burst (thousands
/// of connections that each took buffers, then idled) would otherwise keep that memory.
fn trim_allocator() {
    // SAFETY: mi_collect takes no pointers and only touches the calling thread's heap; it may
    // be called at any time from any thread that uses mimalloc.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

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
            allocator_trim: Some(trim_allocator),
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

#[cfg(test)]
mod tests {
    #[test]
    fn trimming_the_allocator_keeps_live_memory_intact() {
        let keep: Vec<Vec<u8>> = (0..1000)
            .map(|i| vec![(i % 251) as u8; 16 * 1024])
            .collect();
        let garbage: Vec<Vec<u8>> = (0..1000).map(|_| vec![7u8; 16 * 1024]).collect();
        drop(garbage);
        super::trim_allocator();
        assert!(
            keep.iter()
                .enumerate()
                .all(|(i, v)| v.iter().all(|&b| b == (i % 251) as u8))
        );
    }
}
