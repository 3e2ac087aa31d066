//! The `trailmark` command: parses the command line, loads the
//! configuration, and runs one command. Errors end the process with their
//! chain of causes on standard error and exit code 1, never a backtrace.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use trailmark::app::{self, Role};
use trailmark::backends::Backends;
use trailmark::config::{Config, ENV_OVERRIDES};

/// mimalloc rather than glibc's malloc: the services allocate many small,
/// short-lived values per event across threads, where glibc spent a quarter
/// of the process's CPU (benches/RESULTS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Trailmark: an event-sourced customer data platform. Point a Segment SDK
/// at it; it logs every event durably, builds profiles from them, and
/// serves them over the Profile API.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// A TOML configuration file (also TRAILMARK_CONFIG); every key is
    /// optional, see deploy/trailmark.toml [default: none, built-in defaults]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the embedded log and store live (also TRAILMARK_DATA_DIR)
    /// [default: ./data]
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Accepted before the command for compatibility
    /// (`trailmark --listen ADDR ingest`); `trailmark serve --listen ADDR`
    /// is the documented form.
    #[arg(long, hide = true)]
    listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Command,
}

/// The options of the commands that serve HTTP.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Where HTTP listens (also TRAILMARK_LISTEN) [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process: take events, build profiles, answer
    /// the Profile API (the embedded log and store under --data-dir, unless
    /// TRAILMARK_LOG_URI and TRAILMARK_STORE_URI say otherwise)
    Serve(ServeArgs),
    /// Run only the Tracking API (distributed mode: the log must be Kafka,
    /// for projectors in other processes to read it)
    Ingest(ServeArgs),
    /// Run only the projector, which builds profiles from the log
    /// (distributed mode)
    Projector(ServeArgs),
    /// Run only the Profile API (distributed mode)
    QueryApi(ServeArgs),
    /// Run only the audience evaluator, which keeps audiences and computed
    /// traits current (distributed mode; run one)
    Evaluator(ServeArgs),
    /// Rebuild every profile from the log (stop the server first)
    Rebuild,
    /// Create a workspace and print its write key and secret token (embedded
    /// mode: stop the server first)
    CreateWorkspace {
        /// The workspace's name
        #[arg(long)]
        name: String,
    },
    /// Prepare the distributed backends: create the Kafka topics and apply
    /// the store's schema migrations, then create the default workspace if
    /// there is none. Safe to run again; run it before the roles.
    Migrate,
    /// List or replay events the projector set aside (embedded mode: stop
    /// the server first)
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

impl Command {
    /// The listen address given to a serving command.
    fn listen(&self) -> Option<Option<SocketAddr>> {
        match self {
            Command::Serve(a)
            | Command::Ingest(a)
            | Command::Projector(a)
            | Command::QueryApi(a)
            | Command::Evaluator(a) => Some(a.listen),
            _ => None,
        }
    }
}

/// The environment-only settings, for `--help`, from the one list the
/// configuration reads.
fn environment_help() -> String {
    let mut text = String::from(
        "Settings, later ones winning: built-in defaults, the --config file, \
         TRAILMARK_* environment variables, flags.\n\nEnvironment:\n",
    );
    let width = ENV_OVERRIDES
        .iter()
        .map(|(v, _)| v.len())
        .max()
        .unwrap_or(0);
    for (var, setting) in ENV_OVERRIDES {
        text.push_str(&format!("  {var:width$}  sets {setting}\n"));
    }
    text.push_str(&format!(
        "  {:width$}  the configuration file\n  {:width$}  log filter [default: info]\n\n\
         Defaults: log file://<data-dir>/log, store embedded://<data-dir>/store \
         (one process owns a data directory); see deploy/trailmark.toml for every setting.",
        "TRAILMARK_CONFIG", "TRAILMARK_LOG"
    ));
    text
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

fn main() -> ExitCode {
    // Colour only for a person at a terminal, never into a file or a pipe.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TRAILMARK_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let matches = Cli::command().after_help(environment_help()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return report(&anyhow::Error::from(e).context("starting the runtime")),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

/// Prints an error and its causes, one a line: what a person needs, and
/// never a backtrace (even with RUST_BACKTRACE set).
fn report(error: &anyhow::Error) -> ExitCode {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::FAILURE
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let file = cli
        .config
        .clone()
        .or_else(|| std::env::var_os("TRAILMARK_CONFIG").map(PathBuf::from));
    let mut config = Config::load(file.as_deref())?;
    match (cli.command.listen(), cli.listen) {
        (Some(Some(listen)), _) | (Some(None), Some(listen)) => config.listen = listen,
        (None, Some(_)) => {
            anyhow::bail!("--listen applies only to serve, ingest, projector and query-api")
        }
        _ => {}
    }
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    let role = match cli.command {
        Command::Serve(_) => Role::All,
        Command::Ingest(_) => {
            if config.log_uri().starts_with("file://") {
                tracing::warn!(
                    log = %config.log_uri(),
                    "ingest on the embedded file log: nothing will project the events it \
                     accepts, since the log belongs to this process alone; run `trailmark serve`, \
                     or give the roles a Kafka log (TRAILMARK_LOG_URI=kafka://...)"
                );
            }
            Role::Ingest
        }
        Command::Projector(_) => Role::Projector,
        Command::QueryApi(_) => Role::QueryApi,
        Command::Evaluator(_) => Role::Evaluator,
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
            let done = trailmark::backends::migrate(&config).await?;
            // Open (and so lock) the backends before saying anything: on the
            // embedded ones a running server makes this fail, and nothing
            // should read as done first.
            let backends = Backends::open(&config).await?;
            for line in done {
                println!("{line}");
            }
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
