//! Versioned CQL schema migrations.
//!
//! Each migration is a list of statements applied in order and recorded in
//! `schema_migrations`; `trailmark migrate` applies the missing ones, and every
//! role checks at start-up that the keyspace is at exactly the version this
//! build expects. Statements use only CQL that ScyllaDB and Apache Cassandra
//! both accept (no Scylla-only options, no counters, no materialized views).
//!
//! A migration, once released, never changes: add a new one instead.

/// One schema version.
pub struct Migration {
    /// Its version; versions are consecutive from 1.
    pub version: i32,
    /// What it does.
    pub description: &'static str,
    /// The statements, applied in order; each must be safe to run again
    /// (`IF NOT EXISTS`), so a migration cut short can simply be rerun.
    pub statements: &'static [&'static str],
}

/// The bookkeeping table, created before any migration.
pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version int PRIMARY KEY,
    description text,
    applied_at timestamp)";

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "workspaces, credentials, checkpoints, de-duplication, identity links, traits, stats, timelines",
        statements: &[
            "CREATE TABLE IF NOT EXISTS workspaces (
            id text PRIMARY KEY,
            name text,
            created_at bigint)",
            // `w:<write key>` or `t:<sha-256 of token>`.
            "CREATE TABLE IF NOT EXISTS credentials (
            credential text PRIMARY KEY,
            workspace_id text,
            source_id text)",
            "CREATE TABLE IF NOT EXISTS checkpoints (
            consumer text,
            partition int,
            position bigint,
            PRIMARY KEY (consumer, partition))",
            // Written with a TTL of twice the window: expiry is only clean-up, the
            // decision compares `received_at`.
            "CREATE TABLE IF NOT EXISTS dedup (
            workspace text,
            message_id text,
            received_at bigint,
            PRIMARY KEY ((workspace, message_id)))",
            // The identity graph as a grow-only edge set: commutative and
            // idempotent, so projectors of different partitions never race.
            // `first_seen` keeps the minimum event time through write timestamps.
            "CREATE TABLE IF NOT EXISTS identity_links (
            workspace text,
            id text,
            linked text,
            first_seen bigint static,
            PRIMARY KEY ((workspace, id), linked))",
            // One cell per trait; the latest event wins through write timestamps.
            "CREATE TABLE IF NOT EXISTS traits (
            workspace text,
            id text,
            name text,
            value blob,
            PRIMARY KEY ((workspace, id), name))",
            // Read-modify-write by the one projector that owns the identifier's
            // partition; `applied` (partition -> next position) makes it idempotent.
            "CREATE TABLE IF NOT EXISTS stats (
            workspace text,
            id text,
            first_seen bigint,
            last_seen bigint,
            counts frozen<map<text, bigint>>,
            applied frozen<map<int, bigint>>,
            PRIMARY KEY ((workspace, id)))",
            "CREATE TABLE IF NOT EXISTS timeline_buckets (
            workspace text,
            id text,
            bucket bigint,
            PRIMARY KEY ((workspace, id), bucket))",
            "CREATE TABLE IF NOT EXISTS timeline (
            workspace text,
            id text,
            bucket bigint,
            time bigint,
            message_id text,
            counter text,
            body text,
            PRIMARY KEY ((workspace, id, bucket), time, message_id))
            WITH CLUSTERING ORDER BY (time ASC, message_id ASC)",
        ],
    },
    Migration {
        version: 2,
        description: "identity as evidence decided on read: identities, identity_evidence, profile_ids",
        statements: &[
            // What the events that named an identifier say of it, each cell
            // kept by its write timestamp: `created` the minimum event time,
            // `last_seen` the maximum (to the minute), and
            // `first_received`/`first` (the inverted messageId and the
            // source) the smallest canonical key.
            "CREATE TABLE IF NOT EXISTS identities (
                workspace text,
                id text,
                created bigint,
                last_seen bigint,
                first_received bigint,
                first blob,
                PRIMARY KEY ((workspace, id)))",
            // One piece of evidence per slot, under each identifier of it
            // that is not blocked; the smallest key wins by write timestamp,
            // then by the larger (inverted messageId) value.
            "CREATE TABLE IF NOT EXISTS identity_evidence (
                workspace text,
                id text,
                slot blob,
                value blob,
                PRIMARY KEY ((workspace, id), slot))",
            "CREATE TABLE IF NOT EXISTS profile_ids (
                workspace text,
                profile_id uuid,
                id text,
                PRIMARY KEY ((workspace, profile_id)))",
            "DROP TABLE IF EXISTS identity_links",
            // A workspace's settings as JSON, such as `identity_rules`.
            "CREATE TABLE IF NOT EXISTS workspace_settings (
                workspace text,
                name text,
                value text,
                PRIMARY KEY ((workspace), name))",
        ],
    },
    Migration {
        version: 3,
        description: "accounts: memberships in both directions",
        statements: &[
            // What the events that named a membership say of it, each cell
            // kept by its write timestamp, as in `identities`; written by the
            // projector of any member's partition, so only cells that merge
            // by timestamp (no read-modify-write).
            "CREATE TABLE IF NOT EXISTS account_members (
                workspace text,
                account text,
                member text,
                created bigint,
                last_seen bigint,
                first_received bigint,
                first blob,
                PRIMARY KEY ((workspace, account), member))",
            "CREATE TABLE IF NOT EXISTS member_accounts (
                workspace text,
                member text,
                account text,
                created bigint,
                last_seen bigint,
                first_received bigint,
                first blob,
                PRIMARY KEY ((workspace, member), account))",
        ],
    },
    Migration {
        version: 4,
        description: "de-duplication per consumer (the shared table is dropped: its rows only expire); the audience evaluator's rows",
        statements: &[
            // Each consumer of the log (the projector, the audience
            // evaluator) decides for itself which copies of a message it has
            // seen; with one shared row, a second consumer would take every
            // event for a duplicate.
            "CREATE TABLE IF NOT EXISTS consumer_dedup (
                consumer text,
                workspace text,
                message_id text,
                received_at bigint,
                PRIMARY KEY ((consumer, workspace, message_id)))",
            "DROP TABLE IF EXISTS dedup",
            // The evaluator's ordered key-value space (see
            // `trailmark_store::evaluator`): `tbl` is the table's code.
            "CREATE TABLE IF NOT EXISTS evaluator_rows (
                tbl int,
                part blob,
                sort blob,
                value blob,
                PRIMARY KEY ((tbl, part), sort))",
        ],
    },
];

/// The schema version this build reads and writes.
pub fn current_version() -> i32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

/// The tables a rebuild keeps: tenants, their credentials, and the schema's
/// own history. Every other table is in [`PROJECTION_TABLES`] (a test checks).
pub const KEPT_TABLES: &[&str] = &[
    "schema_migrations",
    "workspaces",
    "credentials",
    "workspace_settings",
];

/// The tables that hold projections, emptied by a rebuild.
pub const PROJECTION_TABLES: &[&str] = &[
    "checkpoints",
    "consumer_dedup",
    "identities",
    "identity_evidence",
    "profile_ids",
    "traits",
    "stats",
    "timeline_buckets",
    "timeline",
    "account_members",
    "member_accounts",
    "evaluator_rows",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_and_statements_idempotent() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
            for s in m.statements {
                assert!(
                    s.contains("IF NOT EXISTS") || s.contains("IF EXISTS"),
                    "{s}"
                );
            }
        }
        assert_eq!(current_version(), MIGRATIONS.len() as i32);
    }

    /// A new table must be classified, or a rebuild would keep stale rows.
    #[test]
    fn every_table_is_kept_or_a_projection() {
        let statements = MIGRATIONS
            .iter()
            .flat_map(|m| m.statements)
            .chain(std::iter::once(&MIGRATIONS_TABLE));
        let name = |s: &'static str, verb: &str| {
            s.split(verb)
                .nth(1)
                .map(|rest| rest.split([' ', '(']).next().unwrap_or(""))
        };
        let dropped: Vec<&str> = statements
            .clone()
            .filter_map(|s| name(s, "DROP TABLE IF EXISTS "))
            .collect();
        let mut created: Vec<&str> = statements
            .filter_map(|s| name(s, "CREATE TABLE IF NOT EXISTS "))
            .filter(|t| !dropped.contains(t))
            .collect();
        created.sort_unstable();
        let mut listed: Vec<&str> = KEPT_TABLES
            .iter()
            .chain(PROJECTION_TABLES)
            .copied()
            .collect();
        listed.sort_unstable();
        assert_eq!(created, listed);
    }

    #[test]
    fn projection_tables_exist_in_the_schema() {
        let all: String = MIGRATIONS
            .iter()
            .flat_map(|m| m.statements)
            .copied()
            .collect();
        for t in PROJECTION_TABLES {
            assert!(all.contains(&format!("EXISTS {t} (")), "{t}");
        }
    }
}
