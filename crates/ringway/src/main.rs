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
/// without a restart) or from PostgreSQL (followed through LISTEN/NOTIFY; `ringway migrate`
/// creates the schema). Logs go to stderr (level from RUST_LOG, default info); /metrics,
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
    /// Check a config file and the routes file it names (with its certificates); exit 0 if
    /// all are valid.
    CheckConfig {
        /// Config file (TOML).
        config: PathBuf,
    },
    /// Apply pending PostgreSQL schema migrations (`[postgres] url` of the config) and exit.
    Migrate {
        /// Config file (TOML).
        #[arg(long, short, default_value = "examples/ringway.toml")]
        config: PathBuf,
    },
    /// Write a self-signed certificate and key (ECDSA P-256) for local HTTPS testing.
    DevCert {
        /// Names the certificate covers.
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
        /// Certificate file to write (PEM).
        #[arg(long, default_value = "localhost.crt")]
        cert: PathBuf,
        /// Private key file to write (PEM).
        #[arg(long, default_value = "localhost.key")]
        key: PathBuf,
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
        Command::DevCert { names, cert, key } => dev_cert(&names, &cert, &key),
        Command::Migrate { config } => migrate(config),
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

fn migrate(path: PathBuf) -> anyhow::Result<()> {
    let (config, _) = ringway::load_config(&path)?;
    let applied = ringway::migrate(&config)?;
    if applied.is_empty() {
        println!("schema up to date");
    } else {
        println!("applied migrations {applied:?}");
    }
    Ok(())
}

fn check(path: PathBuf) -> anyhow::Result<()> {
    let (config, base) = ringway::load_config(&path)?;
    if config.routes.store == ringway_core::config::StoreKind::Postgres {
        // The database is not contacted here: `ringway migrate` does, and `serve` reports it.
        println!(
            "{}: ok (routes from PostgreSQL {}, snapshot file {})",
            path.display(),
            ringway_control::pg::redact(&config.postgres.url),
            ringway::resolve(&base, &config.postgres.snapshot_path).display()
        );
        return Ok(());
    }
    let routes_path = ringway::resolve(&base, &config.routes.file);
    let set = ringway_control::file_store::load_routes_file(&routes_path)
        .with_context(|| format!("routes file {}", routes_path.display()))?;
    println!(
        "{}: ok ({} host patterns{}, {} certificates{}, {} policies, routes from {})",
        path.display(),
        set.routes.hosts.len(),
        if set.routes.default.is_some() {
            ", default route"
        } else {
            ""
        },
        set.certs.entries.len(),
        if set.certs.default.is_some() {
            ", default certificate"
        } else {
            ""
        },
        set.policies.by_project.len() + set.policies.by_host.len(),
        routes_path.display()
    );
    Ok(())
}

fn dev_cert(names: &[String], cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<()> {
    let (c, k) = ringway_control::certs::self_signed(names)?;
    for (path, text) in [(cert, c), (key, k)] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "wrote {} and {} (self-signed for {}; for development only)",
        cert.display(),
        key.display(),
        names.join(", ")
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
