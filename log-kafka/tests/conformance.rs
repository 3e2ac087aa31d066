//! The log conformance suite, run against a real Apache Kafka (KRaft).
//! `deploy/local/engines up` starts one on 127.0.0.1:9092;
//! `TRAILMARK_TEST_KAFKA` points elsewhere. Each test gets its own topic,
//! named from its temporary directory, so "reopen" means a new client on the
//! same topic.

use std::path::Path;
use std::sync::Arc;

use trailmark_log::{EventLog, Result};
use trailmark_log_kafka::{KafkaConfig, KafkaLog};

fn topic_for(at: &Path) -> String {
    format!("tm-test-{}", trailmark_testkit::name_for_path(at))
}

fn open(at: &Path) -> Result<Arc<dyn EventLog>> {
    let brokers = std::env::var("TRAILMARK_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let config = KafkaConfig::from_uri(&format!("kafka://{brokers}/{}", topic_for(at)), 4)?;
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            KafkaLog::create_topics(&config).await.unwrap_or_else(|e| {
                panic!(
                    "cannot reach Kafka at {brokers} (start it with `deploy/local/engines up`): {e}"
                )
            });
            Ok(Arc::new(KafkaLog::open(config).await?) as Arc<dyn EventLog>)
        })
    })
}

trailmark_log::event_log_conformance!(open);
