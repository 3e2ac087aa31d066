//! Choosing backends by URI, in the manner of Quickwit's storage resolver.
//!
//! | URI                         | backend                         |
//! |-----------------------------|---------------------------------|
//! | `file://<dir>`              | the embedded file log           |
//! | `kafka://<host:port,...>`   | Apache Kafka (distributed mode) |
//! | `embedded://<dir>`          | the embedded fjall store        |
//! | `scylla://<host:port,...>`  | ScyllaDB / Cassandra            |
//!
//! A backend that this build does not include answers with a clear
//! "unsupported" error rather than vanishing.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use trailmark_log::EventLog;
use trailmark_log::file::{FileLog, FileLogOptions};
use trailmark_store::embedded::EmbeddedStore;
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
    pub fn open(config: &Config) -> anyhow::Result<Self> {
        let (log, file_log) = open_log(config)?;
        let (store, directory, embedded) = open_store(config)?;
        Ok(Self {
            log,
            store,
            directory,
            file_log,
            embedded,
        })
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

fn split_uri(uri: &str) -> anyhow::Result<(&str, &str)> {
    uri.split_once("://")
        .with_context(|| format!("{uri:?} is not a backend uri (scheme://location)"))
}

type LogHandles = (Arc<dyn EventLog>, Option<Arc<FileLog>>);

fn open_log(config: &Config) -> anyhow::Result<LogHandles> {
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
        ("kafka", _) => {
            bail!("unsupported log backend {uri}: this build has no kafka backend yet; use file://")
        }
        (scheme, _) => bail!("unknown log backend scheme {scheme:?} in {uri}; use file://"),
    }
}

type StoreHandles = (
    Arc<dyn ProfileStore>,
    Arc<dyn WorkspaceDirectory>,
    Option<EmbeddedStore>,
);

fn open_store(config: &Config) -> anyhow::Result<StoreHandles> {
    let uri = config.store_uri();
    match split_uri(&uri)? {
        ("embedded", path) => {
            let store = EmbeddedStore::open(PathBuf::from(path))
                .with_context(|| format!("opening the store at {uri}"))?;
            Ok((
                Arc::new(store.clone()),
                Arc::new(store.clone()),
                Some(store),
            ))
        }
        ("scylla", _) => bail!(
            "unsupported store backend {uri}: this build has no scylla backend yet; use embedded://"
        ),
        (scheme, _) => bail!("unknown store backend scheme {scheme:?} in {uri}; use embedded://"),
    }
}
