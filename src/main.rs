//! The `switchboard` binary: command line, config, logging; then the node runs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::config::ClusterConfig;

mod bench;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A chat backend on an actor-model cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one node of the cluster.
    Serve {
        /// The cluster file, the same on every node.
        #[arg(long, default_value = "cluster.toml")]
        config: PathBuf,
        /// Which `[[node]]` this process is; optional when the file has one node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Load tool: drives a running node or cluster through the client contract and
    /// measures delivery end to end (see docs/BENCHMARKS.md).
    Bench {
        #[command(flatten)]
        common: bench::Common,
        #[command(subcommand)]
        workload: bench::Workload,
    },
}

fn main() -> ExitCode {
    keep_large_allocations_returnable();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve { config, node } => serve(config, node),
        Command::Bench { common, workload } => match bench::run(common, workload) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

/// Makes glibc serve every allocation of 1 MiB or more with its own mapping, returned
/// to the system when freed.
///
/// By default glibc raises that threshold each time such a block is freed, so after
/// the first few password hashes (19 MiB of Argon2 memory each, on whichever blocking
/// thread ran them) later ones come from per-thread heaps that fragmentation keeps from
/// shrinking: measured here, a node's RSS grew by about 1 GiB per thousand
/// registrations and stayed there (`malloc_trim` gave 5.3 GiB back). Setting the
/// threshold explicitly turns that adjustment off.
fn keep_large_allocations_returnable() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn serve(path: PathBuf, node: Option<String>) -> ExitCode {
    let shown = path.display().to_string();
    let loaded = ClusterConfig::load(&path).and_then(|c| {
        c.select_node(node.as_deref(), &shown)
            .cloned()
            .map(|n| (c, n))
    });
    let (config, node) = match loaded {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let result: anyhow::Result<()> = actix_web::rt::System::new()
        .block_on(switchboard::net::serve(config, node, path))
        .map_err(anyhow::Error::from);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
