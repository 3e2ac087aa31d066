//! The `trailmark` command.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use trailmark::app::{self, Role};
use trailmark::backends::Backends;
use trailmark::config::Config;

/// Trailmark: an event-sourced customer data platform.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// A TOML configuration file (also `TRAILMARK_CONFIG`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Where HTTP listens (also `TRAILMARK_LISTEN`).
    #[arg(long, global = true)]
    listen: Option<std::net::SocketAddr>,
    /// Where the embedded log and store live (also `TRAILMARK_DATA_DIR`).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run ingest, projector and query API in one process.
    Serve,
    /// Run only the Tracking API.
    Ingest,
    /// Run only the projector.
    Projector,
    /// Run only the query API.
    QueryApi,
    /// Rebuild every projection from the log (stop other roles first).
    Rebuild,
    /// Create a workspace and print its credentials.
    CreateWorkspace {
        /// Its name.
        #[arg(long)]
        name: String,
    },
    /// Prepare the distributed backends: create the Kafka topics and apply
    /// the store's schema migrations, then create the bootstrap workspace if
    /// there is none. Safe to run again; run it before the roles.
    Migrate,
    /// Inspect or replay records the projector set aside.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Debug, Subcommand)]
enum DeadLetterAction {
    /// Print dead letters: where each came from and why.
    List {
        /// The dead-letter position to start at.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Append dead letters to the log again, for the projector to retry once
    /// the cause is fixed. Replaying one twice is harmless: the projector
    /// de-duplicates by messageId.
    Replay {
        /// The dead-letter position to start at.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TRAILMARK_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let file = cli
        .config
        .clone()
        .or_else(|| std::env::var_os("TRAILMARK_CONFIG").map(PathBuf::from));
    let mut config = Config::load(file.as_deref())?;
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    let role = match cli.command {
        Command::Serve => Role::All,
        Command::Ingest => Role::Ingest,
        Command::Projector => Role::Projector,
        Command::QueryApi => Role::QueryApi,
        Command::Rebuild => {
            let applied = app::rebuild(&config).await?;
            println!("rebuilt every projection from the log: {applied} records replayed");
            return Ok(());
        }
        Command::CreateWorkspace { name } => {
            let backends = Backends::open(&config).await?;
            let created = backends
                .directory
                .create_workspace(&name, None, None)
                .await?;
            backends.close();
            println!(
                "created workspace {:?} ({})\n  write key: {}\n  secret token: {}",
                created.workspace.name, created.workspace.id, created.write_key, created.token
            );
            return Ok(());
        }
        Command::Migrate => {
            for line in trailmark::backends::migrate(&config).await? {
                println!("{line}");
            }
            let backends = Backends::open(&config).await?;
            let created = app::bootstrap(&*backends.directory, &config).await?;
            backends.close();
            match created {
                Some(created) => println!(
                    "created workspace {:?} ({})\n  write key: {}\n  secret token: {}",
                    created.workspace.name, created.workspace.id, created.write_key, created.token
                ),
                None => println!("workspaces already exist; none created"),
            }
            return Ok(());
        }
        Command::DeadLetters { action } => {
            let backends = Backends::open(&config).await?;
            match action {
                DeadLetterAction::List { from, limit } => {
                    let letters = backends.log.dead_letters(from, limit).await?;
                    for (at, l) in &letters {
                        println!(
                            "{at}\t{}\tpartition {}\toffset {}\t{} bytes\t{}",
                            l.source,
                            l.partition,
                            l.position,
                            l.payload.len(),
                            l.error
                        );
                    }
                    println!("{} dead letters from position {from}", letters.len());
                }
                DeadLetterAction::Replay { from } => {
                    let (replayed, next) = app::replay_dead_letters(&backends, from).await?;
                    println!(
                        "replayed {replayed} dead letters into the log; the next position is {next}"
                    );
                }
            }
            backends.close();
            return Ok(());
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    app::run(config, role, listener, shutdown_signal()).await
}
