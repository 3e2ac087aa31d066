//! The prepared statements of the store, each with the configured
//! consistency.

use super::*;

/// The prepared statements, each with the configured consistency.
pub(crate) struct Statements {
    pub(crate) named_created: PreparedStatement,
    pub(crate) named_last: PreparedStatement,
    pub(crate) named_first: PreparedStatement,
    pub(crate) upsert_evidence: PreparedStatement,
    pub(crate) insert_profile_id: PreparedStatement,
    pub(crate) select_identity: PreparedStatement,
    pub(crate) select_evidence: PreparedStatement,
    pub(crate) select_profile_id: PreparedStatement,
    pub(crate) upsert_trait: PreparedStatement,
    pub(crate) insert_timeline: PreparedStatement,
    pub(crate) insert_bucket: PreparedStatement,
    pub(crate) select_stats: PreparedStatement,
    pub(crate) upsert_stats: PreparedStatement,
    pub(crate) select_dedup: PreparedStatement,
    pub(crate) insert_dedup: PreparedStatement,
    pub(crate) upsert_checkpoint: PreparedStatement,
    pub(crate) select_checkpoints: PreparedStatement,
    pub(crate) select_traits: PreparedStatement,
    pub(crate) buckets_asc: PreparedStatement,
    pub(crate) buckets_desc: PreparedStatement,
    pub(crate) timeline_asc_from: PreparedStatement,
    pub(crate) timeline_asc_after: PreparedStatement,
    pub(crate) timeline_desc_from: PreparedStatement,
    pub(crate) timeline_desc_before: PreparedStatement,
    pub(crate) insert_workspace: PreparedStatement,
    pub(crate) select_workspaces: PreparedStatement,
    pub(crate) insert_credential: PreparedStatement,
    pub(crate) select_credential: PreparedStatement,
    pub(crate) ready: PreparedStatement,
    pub(crate) insert_setting: PreparedStatement,
    pub(crate) select_setting: PreparedStatement,
    pub(crate) select_settings_from: PreparedStatement,
    pub(crate) delete_setting: PreparedStatement,
    /// `account_members`, then `member_accounts`.
    pub(crate) memberships: [Membership; 2],
    /// The evaluator's rows.
    pub(crate) eval: EvalStatements,
}

/// The statements of the evaluator's rows (`evaluator_rows`).
pub(crate) struct EvalStatements {
    pub(crate) put: PreparedStatement,
    pub(crate) delete: PreparedStatement,
    pub(crate) get: PreparedStatement,
    /// Scans: from the start or after a key, to the end or before a key.
    pub(crate) scan: [PreparedStatement; 4],
}

/// The statements of one side of the memberships: its three cells, as in
/// `identities`, and a page of rows.
pub(crate) struct Membership {
    pub(crate) created: PreparedStatement,
    pub(crate) last: PreparedStatement,
    pub(crate) first: PreparedStatement,
    pub(crate) page: PreparedStatement,
}

const TIMELINE_COLUMNS: &str = "SELECT time, message_id, counter, body FROM timeline WHERE workspace = ? AND id = ? AND bucket = ?";

impl Statements {
    pub(crate) async fn prepare(session: &Session, keyspace: &str) -> Result<Self> {
        // Table names are qualified: prepared statements under `USE` are
        // ambiguous, and Cassandra warns on every one.
        let p = |cql: String| async move {
            let cql = qualify(&cql, keyspace);
            let mut s = session.prepare(cql).await.map_err(classify)?;
            s.set_is_idempotent(true);
            Ok::<_, StoreError>(s)
        };
        let tl = |rest: &str| format!("{TIMELINE_COLUMNS} {rest}");
        let membership = |table: &'static str, owner: &'static str, other: &'static str| {
            let cell = move |set: &str| {
                format!(
                    "UPDATE {table} USING TIMESTAMP ? SET {set} WHERE workspace = ? AND {owner} = ? AND {other} = ?"
                )
            };
            let cql = [
                cell("created = ?"),
                cell("last_seen = ?"),
                cell("first_received = ?, first = ?"),
                format!(
                    "SELECT {other}, created, last_seen, first_received, first FROM {table} WHERE workspace = ? AND {owner} = ? AND {other} > ? LIMIT ?"
                ),
            ];
            async move {
                let [created, last, first, page] = cql;
                Ok::<_, StoreError>(Membership {
                    created: p(created).await?,
                    last: p(last).await?,
                    first: p(first).await?,
                    page: p(page).await?,
                })
            }
        };
        Ok(Self {
            named_created: p("UPDATE identities USING TIMESTAMP ? SET created = ? WHERE workspace = ? AND id = ?".into()).await?,
            named_last: p("UPDATE identities USING TIMESTAMP ? SET last_seen = ? WHERE workspace = ? AND id = ?".into()).await?,
            named_first: p("UPDATE identities USING TIMESTAMP ? SET first_received = ?, first = ? WHERE workspace = ? AND id = ?".into()).await?,
            upsert_evidence: p("UPDATE identity_evidence USING TIMESTAMP ? SET value = ? WHERE workspace = ? AND id = ? AND slot = ?".into()).await?,
            insert_profile_id: p("INSERT INTO profile_ids (workspace, profile_id, id) VALUES (?, ?, ?)".into()).await?,
            select_identity: p("SELECT created, last_seen, first_received, first FROM identities WHERE workspace = ? AND id = ?".into()).await?,
            // One more than an identifier may carry tells it is too many.
            select_evidence: p(format!("SELECT value FROM identity_evidence WHERE workspace = ? AND id = ? LIMIT {}", MAX_ID_EVIDENCE + 1)).await?,
            select_profile_id: p("SELECT id FROM profile_ids WHERE workspace = ? AND profile_id = ?".into()).await?,
            upsert_trait: p("UPDATE traits USING TIMESTAMP ? SET value = ? WHERE workspace = ? AND id = ? AND name = ?".into()).await?,
            insert_timeline: p("INSERT INTO timeline (workspace, id, bucket, time, message_id, counter, body) VALUES (?, ?, ?, ?, ?, ?, ?)".into()).await?,
            insert_bucket: p("INSERT INTO timeline_buckets (workspace, id, bucket) VALUES (?, ?, ?)".into()).await?,
            select_stats: p("SELECT first_seen, last_seen, counts, applied FROM stats WHERE workspace = ? AND id = ?".into()).await?,
            upsert_stats: p("INSERT INTO stats (workspace, id, first_seen, last_seen, counts, applied) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?".into()).await?,
            select_dedup: p("SELECT received_at FROM consumer_dedup WHERE consumer = ? AND workspace = ? AND message_id = ?".into()).await?,
            insert_dedup: p("INSERT INTO consumer_dedup (consumer, workspace, message_id, received_at) VALUES (?, ?, ?, ?) USING TTL ?".into()).await?,
            upsert_checkpoint: p("INSERT INTO checkpoints (consumer, partition, position) VALUES (?, ?, ?) USING TIMESTAMP ?".into()).await?,
            select_checkpoints: p("SELECT partition, position FROM checkpoints WHERE consumer = ?".into()).await?,
            select_traits: p("SELECT name, value FROM traits WHERE workspace = ? AND id = ?".into()).await?,
            buckets_asc: p("SELECT bucket FROM timeline_buckets WHERE workspace = ? AND id = ? AND bucket >= ? AND bucket <= ? ORDER BY bucket ASC".into()).await?,
            buckets_desc: p("SELECT bucket FROM timeline_buckets WHERE workspace = ? AND id = ? AND bucket >= ? AND bucket <= ? ORDER BY bucket DESC".into()).await?,
            timeline_asc_from: p(tl("AND time >= ? AND time < ? ORDER BY time ASC, message_id ASC LIMIT ?")).await?,
            timeline_asc_after: p(tl("AND (time, message_id) > (?, ?) AND (time, message_id) < (?, '') ORDER BY time ASC, message_id ASC LIMIT ?")).await?,
            timeline_desc_from: p(tl("AND time >= ? AND time < ? ORDER BY time DESC, message_id DESC LIMIT ?")).await?,
            timeline_desc_before: p(tl("AND (time, message_id) >= (?, '') AND (time, message_id) < (?, ?) ORDER BY time DESC, message_id DESC LIMIT ?")).await?,
            insert_workspace: p("INSERT INTO workspaces (id, name, created_at) VALUES (?, ?, ?)".into()).await?,
            select_workspaces: p("SELECT id, name, created_at FROM workspaces".into()).await?,
            insert_credential: p("INSERT INTO credentials (credential, workspace_id, source_id) VALUES (?, ?, ?)".into()).await?,
            select_credential: p("SELECT workspace_id, source_id FROM credentials WHERE credential = ?".into()).await?,
            ready: p("SELECT version FROM schema_migrations WHERE version = ?".into()).await?,
            insert_setting: p("INSERT INTO workspace_settings (workspace, name, value) VALUES (?, ?, ?)".into()).await?,
            select_setting: p("SELECT value FROM workspace_settings WHERE workspace = ? AND name = ?".into()).await?,
            select_settings_from: p("SELECT name, value FROM workspace_settings WHERE workspace = ? AND name >= ?".into()).await?,
            delete_setting: p("DELETE FROM workspace_settings WHERE workspace = ? AND name = ?".into()).await?,
            memberships: [
                membership("account_members", "account", "member").await?,
                membership("member_accounts", "member", "account").await?,
            ],
            eval: {
                let scan = |bounds: &str| {
                    format!("SELECT sort, value FROM evaluator_rows WHERE tbl = ? AND part = ? {bounds} LIMIT ?")
                };
                EvalStatements {
                    put: p("INSERT INTO evaluator_rows (tbl, part, sort, value) VALUES (?, ?, ?, ?) USING TIMESTAMP ?".into()).await?,
                    delete: p("DELETE FROM evaluator_rows USING TIMESTAMP ? WHERE tbl = ? AND part = ? AND sort = ?".into()).await?,
                    get: p("SELECT value FROM evaluator_rows WHERE tbl = ? AND part = ? AND sort = ?".into()).await?,
                    scan: [
                        p(scan("")).await?,
                        p(scan("AND sort > ?")).await?,
                        p(scan("AND sort < ?")).await?,
                        p(scan("AND sort > ? AND sort < ?")).await?,
                    ],
                }
            },
        })
    }
}
