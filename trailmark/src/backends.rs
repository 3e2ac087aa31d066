//! Choosing backends by URI, in the manner of Quickwit's storage resolver.
//!
//! | URI                                         | backend                         |
//! |---------------------------------------------|---------------------------------|
//! | `file://<dir>`                              | the embedded file log           |
//! | `kafka://<host:port,...>[/topic][?options]` | Apache Kafka (distributed mode) |
//! | `embedded://<dir>`                          | the embedded fjall store        |
//! | `scylla://<host:port,...>[/keyspace][?...]` | ScyllaDB / Cassandra            |
//!
//! A backend that this build does not include (cargo features `kafka` and
//! `scylla`, both on by default) answers with a clear "unsupported" error
//! rather than vanishing. The embedded backends create themselves on open;
//! the distributed ones are created by [`migrate`] (`trailmark migrate`) and
//! only checked on open.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use trailmark_log::EventLog;
use trailmark_log::file::{FileLog, FileLogOptions};
use trailmark_store::embedded::{EmbeddedOptions, EmbeddedStore};
use trailmark_store::{ProfileStore, WorkspaceDirectory};

use crate::config::Config;

/// The opened backends.
pub struct Backends {
    /// The log.
    pub log: Arc<dyn EventLog>,
    /// Projections.
    pub store: Arc<dyn ProfileStore>,
    /// Workspaces.
    pub directory: Arc<dyn WorkspaceDirectory>,
    file_log: Option<Arc<FileLog>>,
    embedded: Option<EmbeddedStore>,
}

impl Backends {
    /// Opens the log and store the configuration names.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        Self::open_inner(config, false).await
    }

    /// Opens the backends for `trailmark rebuild`: an embedded store drops
    /// its projections whole as it opens (other stores are emptied by
    /// [`trailmark_store::ProfileWriter::reset_projections`]).
    pub async fn open_for_rebuild(config: &Config) -> anyhow::Result<Self> {
        Self::open_inner(config, true).await
    }

    async fn open_inner(config: &Config, drop_projections: bool) -> anyhow::Result<Self> {
        let (log, file_log) = open_log(config)
            .await
            .map_err(|e| explain_in_use(config, e))?;
        let (store, directory, embedded) = open_store(config, drop_projections).await?;
        Ok(Self {
            log,
            store,
            directory,
            file_log,
            embedded,
        })
    }

    /// Whether the store is the embedded one (one process owns it).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Flushes and closes what needs it, for a clean shutdown.
    pub fn close(&self) {
        if let Some(log) = &self.file_log {
            log.close();
        }
        if let Some(store) = &self.embedded
            && let Err(e) = store.persist()
        {
            tracing::warn!(error = %e, "flushing the embedded store failed");
        }
    }
}

/// When the embedded log could not be opened because another process holds
/// its lock, says so in terms of what to do.
fn explain_in_use(config: &Config, error: anyhow::Error) -> anyhow::Error {
    let uri = config.log_uri();
    let Some(dir) = uri.strip_prefix("file://") else {
        return error;
    };
    let held = std::fs::File::open(std::path::Path::new(dir).join("LOCK"))
        .is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)));
    if !held {
        return error;
    }
    error.context(format!(
        "the embedded data directory {} is in use by a running Trailmark process \
         (`trailmark serve`?). Stop it, then run this command again: with the embedded \
         backends one process owns the log and the store, because each has a single \
         writer",
        config.data_dir.display()
    ))
}

fn split_uri(uri: &str) -> anyhow::Result<(&str, &str)> {
    uri.split_once("://")
        .with_context(|| format!("{uri:?} is not a backend uri (scheme://location)"))
}

type LogHandles = (Arc<dyn EventLog>, Option<Arc<FileLog>>);

async fn open_log(config: &Config) -> anyhow::Result<LogHandles> {
    let uri = config.log_uri();
    match split_uri(&uri)? {
        ("file", path) => {
            let log = Arc::new(
                FileLog::open(
                    PathBuf::from(path),
                    FileLogOptions {
                        partitions: config.log.partitions,
                        segment_bytes: config.log.segment_bytes,
                        ..FileLogOptions::default()
                    },
                )
                .with_context(|| format!("opening the log at {uri}"))?,
            );
            Ok((log.clone(), Some(log)))
        }
        #[cfg(feature = "kafka")]
        ("kafka", _) => {
            use trailmark_log_kafka::{KafkaConfig, KafkaLog};
            let kafka = KafkaConfig::from_uri(&uri, config.log.partitions)?;
            let log = KafkaLog::open(kafka)
                .await
                .with_context(|| format!("opening the log at {uri}"))?;
            Ok((Arc::new(log), None))
        }
        #[cfg(not(feature = "kafka"))]
        ("kafka", _) => bail!(
            "unsupported log backend {uri}: this build was compiled without the `kafka` feature"
        ),
        (scheme, _) => {
            bail!("unknown log backend scheme {scheme:?} in {uri}; use file:// or kafka://")
        }
    }
}

type StoreHandles = (
    Arc<dyn ProfileStore>,
    Arc<dyn WorkspaceDirectory>,
    Option<EmbeddedStore>,
);

async fn open_store(config: &Config, drop_projections: bool) -> anyhow::Result<StoreHandles> {
    let uri = config.store_uri();
    match split_uri(&uri)? {
        ("embedded", path) => {
            let options = EmbeddedOptions {
                cache_bytes: config.projector.fold_cache_mb << 20,
                block_cache_bytes: (config.projector.block_cache_mb as u64) << 20,
                drop_projections,
            };
            let store = EmbeddedStore::open_with(PathBuf::from(path), options)
                .with_context(|| format!("opening the store at {uri}"))?;
            Ok((
                Arc::new(store.clone()),
                Arc::new(store.clone()),
                Some(store),
            ))
        }
        #[cfg(feature = "scylla")]
        ("scylla", _) => {
            use trailmark_store_scylla::{ScyllaConfig, ScyllaStore};
            let store = ScyllaStore::connect(&ScyllaConfig::from_uri(&uri)?)
                .await
                .with_context(|| format!("opening the store at {uri}"))?;
            Ok((Arc::new(store.clone()), Arc::new(store), None))
        }
        #[cfg(not(feature = "scylla"))]
        ("scylla", _) => bail!(
            "unsupported store backend {uri}: this build was compiled without the `scylla` feature"
        ),
        (scheme, _) => {
            bail!("unknown store backend scheme {scheme:?} in {uri}; use embedded:// or scylla://")
        }
    }
}

/// Creates what the distributed backends need: the Kafka topics (events and
/// dead letters, infinite retention) and the CQL schema, applying missing
/// migrations in order. Safe to run again. Returns what it did, for people.
pub async fn migrate(config: &Config) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    let log_uri = config.log_uri();
    match split_uri(&log_uri)?.0 {
        #[cfg(feature = "kafka")]
        "kafka" => {
            let kafka =
                trailmark_log_kafka::KafkaConfig::from_uri(&log_uri, config.log.partitions)?;
            trailmark_log_kafka::KafkaLog::create_topics(&kafka)
                .await
                .with_context(|| format!("creating the topics at {log_uri}"))?;
            done.push(format!(
                "kafka topics {} ({} partitions) and {} are in place",
                kafka.topic,
                kafka.partitions,
                kafka.dead_letter_topic()
            ));
        }
        _ => done.push("the log needs no migration".into()),
    }
    let store_uri = config.store_uri();
    match split_uri(&store_uri)?.0 {
        #[cfg(feature = "scylla")]
        "scylla" => {
            let scylla = trailmark_store_scylla::ScyllaConfig::from_uri(&store_uri)?;
            let applied = trailmark_store_scylla::ScyllaStore::migrate(&scylla)
                .await
                .with_context(|| format!("migrating the store at {store_uri}"))?;
            done.push(format!(
                "store keyspace {} is at schema version {} (applied now: {applied:?})",
                scylla.keyspace,
                trailmark_store_scylla::schema::current_version()
            ));
        }
        _ => done.push("the store needs no migration".into()),
    }
    Ok(done)
}
