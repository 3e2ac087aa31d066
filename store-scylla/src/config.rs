//! [`ScyllaConfig`]: how the store reaches its cluster, parsed from a
//! `scylla://` URI.

use super::*;

/// How the store reaches its cluster, from a `scylla://` URI:
/// `scylla://host:9042[,host:9042...][/keyspace][?replication_factor=1&dc=NAME&consistency=local_quorum]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScyllaConfig {
    /// Contact points, `host:port`.
    pub hosts: Vec<String>,
    /// The keyspace (default `trailmark`).
    pub keyspace: String,
    /// Replicas per data centre, used when `migrate` creates the keyspace.
    pub replication_factor: u32,
    /// With a data centre name, the keyspace uses `NetworkTopologyStrategy`
    /// there; without, `SimpleStrategy` (for one-DC test clusters).
    pub datacenter: Option<String>,
    /// The consistency of reads and writes: a quorum or more, never less
    /// (the crate's "Consistency" section says why).
    pub consistency: Consistency,
}

impl ScyllaConfig {
    /// Parses a `scylla://` URI.
    pub fn from_uri(uri: &str) -> Result<Self> {
        let bad = |why: &str| StoreError::Invalid(format!("bad store uri {uri:?}: {why}"));
        let rest = uri
            .strip_prefix("scylla://")
            .ok_or_else(|| bad("expected scylla://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (hosts, keyspace) = rest.split_once('/').unwrap_or((rest, ""));
        let hosts: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|h| {
                if h.contains(':') {
                    h.to_owned()
                } else {
                    format!("{h}:9042")
                }
            })
            .collect();
        if hosts.is_empty() {
            return Err(bad("no host"));
        }
        let keyspace = if keyspace.is_empty() {
            "trailmark".to_owned()
        } else {
            keyspace.to_owned()
        };
        if !keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || keyspace.len() > 48
        {
            return Err(bad("keyspace must be letters, digits and _ (at most 48)"));
        }
        let mut config = ScyllaConfig {
            hosts,
            keyspace,
            replication_factor: 1,
            datacenter: None,
            consistency: Consistency::LocalQuorum,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| bad("query is k=v"))?;
            match k {
                "replication_factor" => {
                    config.replication_factor = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad("replication_factor is a positive number"))?
                }
                "dc" => config.datacenter = Some(v.to_owned()),
                "consistency" => {
                    config.consistency = match v.to_ascii_lowercase().as_str() {
                        "quorum" => Consistency::Quorum,
                        "local_quorum" => Consistency::LocalQuorum,
                        "each_quorum" => Consistency::EachQuorum,
                        "all" => Consistency::All,
                        // See the crate's "Consistency" section.
                        "one" | "local_one" | "two" | "three" | "any" => {
                            return Err(bad(
                                "consistency below a quorum is refused: a read could miss \
                                 the last acknowledged write, and the projector would count \
                                 events twice or lose them; use local_quorum",
                            ));
                        }
                        _ => return Err(bad("unknown consistency")),
                    }
                }
                _ => return Err(bad(&format!("unknown option {k}"))),
            }
        }
        Ok(config)
    }

    pub(crate) fn replication(&self) -> String {
        match &self.datacenter {
            Some(dc) => format!(
                "{{'class': 'NetworkTopologyStrategy', '{}': {}}}",
                dc.replace('\'', ""),
                self.replication_factor
            ),
            None => format!(
                "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                self.replication_factor
            ),
        }
    }
}
