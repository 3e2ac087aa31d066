//! The store conformance suite, run against a real Apache Cassandra (the
//! same CQL as ScyllaDB). `deploy/local/engines up` starts one on
//! 127.0.0.1:9042; `TRAILMARK_TEST_CASSANDRA` points elsewhere. Each test gets
//! its own keyspace, named from its temporary directory.

use std::path::Path;
use std::sync::Arc;

use trailmark_store::{ProfileStore, WorkspaceDirectory};
use trailmark_store_scylla::{ScyllaConfig, ScyllaStore};

/// Schema changes from parallel tests would race for schema agreement.
static MIGRATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn keyspace_for(at: &Path) -> String {
    format!("tm_test_{}", trailmark_testkit::name_for_path(at))
}

fn open(at: &Path) -> (Arc<dyn ProfileStore>, Arc<dyn WorkspaceDirectory>) {
    let host =
        std::env::var("TRAILMARK_TEST_CASSANDRA").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let config =
        ScyllaConfig::from_uri(&format!("scylla://{host}/{}", keyspace_for(at))).expect("uri");
    let store = tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            {
                let _one = MIGRATING.lock().await;
                ScyllaStore::migrate(&config).await.unwrap_or_else(|e| {
                    panic!("cannot migrate Cassandra at {host} (start it with `deploy/local/engines up`): {e}")
                });
            }
            ScyllaStore::connect(&config).await.expect("connect")
        })
    });
    (Arc::new(store.clone()), Arc::new(store))
}

trailmark_store::store_conformance!(open);
