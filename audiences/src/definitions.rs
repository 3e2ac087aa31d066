//! Definitions as stored: each audience or computed trait is one workspace
//! setting (`audience/{id}`, `computed_trait/{id}`) holding every version,
//! written by the admin API; the evaluator writes how far each has got in
//! another (`status/{id}`), so the two writers never touch the same row.
//!
//! [`Definitions::create`] and [`Definitions::update`] check a definition
//! against the workspace's others (keys, references, cycles) before storing
//! a new version; nothing stored is ever taken on trust by the evaluator
//! either: it compiles what it reads, and skips what does not compile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trailmark_domain::audience::ast::{ComputedTrait, Condition};
use trailmark_domain::audience::json::{
    computed_trait_from_json, computed_trait_to_json, condition_from_json, condition_to_json,
};
use trailmark_domain::audience::query::parse_query;
use trailmark_domain::audience::{
    AudienceDef, Catalog, DefinitionError, TraitDef, check_key, check_references,
};
use trailmark_domain::{Clock, SystemClock};
use trailmark_store::{StoreError, WorkspaceDirectory};

/// The most audiences, and the most computed traits, one workspace defines.
pub const MAX_DEFINITIONS: usize = 500;
/// The longest a name or description may be, in bytes.
pub const MAX_TEXT: usize = 1_000;

/// The two kinds of definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An audience: who matches a condition.
    Audience,
    /// A computed trait: a value reduced from events.
    ComputedTrait,
}

impl Kind {
    /// The prefix of its settings and ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Audience => "audience",
            Kind::ComputedTrait => "computed_trait",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Audience => "aud_",
            Kind::ComputedTrait => "ct_",
        }
    }

    fn setting(self, id: &str) -> String {
        format!("{}/{id}", self.as_str())
    }
}

/// One stored definition with all its versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionRecord {
    /// Its id (`aud_…`, `ct_…`), stable across versions.
    pub id: String,
    /// Its kind.
    pub kind: Kind,
    /// Its key: unique among the workspace's definitions of its kind.
    pub key: String,
    /// A human name.
    pub name: String,
    /// A description.
    #[serde(default)]
    pub description: String,
    /// Every version, oldest first.
    pub versions: Vec<VersionRecord>,
    /// When it was created, microseconds.
    pub created_at: i64,
}

/// One version of a definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// 1, 2, …
    pub version: u32,
    /// The definition in its JSON form (as read back, canonical).
    pub definition: Value,
    /// The text it was written in, if it was.
    #[serde(default)]
    pub query: Option<String>,
    /// When it was created, microseconds.
    pub created_at: i64,
}

impl DefinitionRecord {
    /// The newest version.
    pub fn latest(&self) -> &VersionRecord {
        self.versions.last().expect("a definition has a version")
    }
}

/// What the evaluator says of a definition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// The version that decides memberships, if any yet.
    pub live_version: Option<u32>,
    /// The newest version whose backfill is under way.
    pub backfilling_version: Option<u32>,
    /// Members (audiences) or profiles with a value (computed traits).
    pub size: u64,
    /// When `size` was counted, microseconds.
    pub size_as_of: i64,
    /// How far behind the log the evaluator was then, milliseconds.
    pub eval_lag_ms: u64,
}

/// A request to define or redefine something.
#[derive(Debug, Clone, Default)]
pub struct DefinitionInput {
    /// The key (required on create; may not change on update).
    pub key: Option<String>,
    /// A human name.
    pub name: Option<String>,
    /// A description.
    pub description: Option<String>,
    /// The JSON form.
    pub definition: Option<Value>,
    /// The text form (audiences only).
    pub query: Option<String>,
}

/// Why a definition request failed.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionsError {
    /// The request is wrong: the path at fault, and why.
    #[error(transparent)]
    Invalid(#[from] DefinitionError),
    /// No such definition.
    #[error("no such definition")]
    NotFound,
    /// The key is taken.
    #[error("the key {0:?} is taken")]
    Conflict(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads and writes a workspace's definitions through the directory.
#[derive(Clone)]
pub struct Definitions {
    directory: Arc<dyn WorkspaceDirectory>,
    clock: Arc<dyn Clock>,
}

impl Definitions {
    /// Definitions kept in `directory`.
    pub fn new(directory: Arc<dyn WorkspaceDirectory>) -> Self {
        Self {
            directory,
            clock: Arc::new(SystemClock),
        }
    }

    /// The same, with an injected clock for creation times.
    pub fn with_clock(directory: Arc<dyn WorkspaceDirectory>, clock: Arc<dyn Clock>) -> Self {
        Self { directory, clock }
    }

    /// Every definition of a kind in a workspace, by id.
    pub async fn list(&self, ws: &str, kind: Kind) -> Result<Vec<DefinitionRecord>, StoreError> {
        let rows = self
            .directory
            .settings(ws, &format!("{}/", kind.as_str()))
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, v)| match serde_json::from_str(&v) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(setting = %name, error = %e, "unreadable definition; skipped");
                    None
                }
            })
            .collect())
    }

    /// One definition.
    pub async fn get(
        &self,
        ws: &str,
        kind: Kind,
        id: &str,
    ) -> Result<DefinitionRecord, DefinitionsError> {
        self.list(ws, kind)
            .await?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or(DefinitionsError::NotFound)
    }

    /// What the evaluator last said of a definition.
    pub async fn status(&self, ws: &str, id: &str) -> Result<StatusRecord, StoreError> {
        let rows = self.directory.settings(ws, &format!("status/{id}")).await?;
        Ok(rows
            .into_iter()
            .find(|(n, _)| n == &format!("status/{id}"))
            .and_then(|(_, v)| serde_json::from_str(&v).ok())
            .unwrap_or_default())
    }

    /// Records what the evaluator says of a definition.
    pub async fn set_status(
        &self,
        ws: &str,
        id: &str,
        status: &StatusRecord,
    ) -> Result<(), StoreError> {
        let text = serde_json::to_string(status).expect("status serialises");
        self.directory
            .put_setting(ws, &format!("status/{id}"), Some(&text))
            .await
    }

    /// Creates a definition (version 1) after checking it.
    pub async fn create(
        &self,
        ws: &str,
        kind: Kind,
        input: DefinitionInput,
    ) -> Result<DefinitionRecord, DefinitionsError> {
        let key = input
            .key
            .clone()
            .ok_or_else(|| DefinitionError::new("key", "required"))?;
        check_key(&key).map_err(|m| DefinitionError::new("key", m))?;
        let existing = self.list(ws, kind).await?;
        if existing.iter().any(|r| r.key == key) {
            return Err(DefinitionsError::Conflict(key));
        }
        if existing.len() >= MAX_DEFINITIONS {
            return Err(DefinitionError::new(
                "key",
                format!("a workspace defines at most {MAX_DEFINITIONS} of these"),
            )
            .into());
        }
        let now = self.clock.now_micros();
        let version = self.checked_version(ws, kind, &key, &input, 1, now).await?;
        let record = DefinitionRecord {
            id: format!("{}{}", kind.id_prefix(), uuid::Uuid::now_v7().simple()),
            kind,
            key,
            name: text(input.name, "name")?.unwrap_or_default(),
            description: text(input.description, "description")?.unwrap_or_default(),
            versions: vec![version],
            created_at: now,
        };
        self.store(ws, &record).await?;
        Ok(record)
    }

    /// Adds a version (when the definition changes) or renames. The key
    /// cannot change: events and other definitions name it.
    pub async fn update(
        &self,
        ws: &str,
        kind: Kind,
        id: &str,
        input: DefinitionInput,
    ) -> Result<DefinitionRecord, DefinitionsError> {
        let mut record = self.get(ws, kind, id).await?;
        if let Some(k) = &input.key
            && k != &record.key
        {
            return Err(DefinitionError::new("key", "a key cannot change").into());
        }
        if input.definition.is_some() || input.query.is_some() {
            let next = record.latest().version + 1;
            let now = self.clock.now_micros();
            let version = self
                .checked_version(ws, kind, &record.key.clone(), &input, next, now)
                .await?;
            if version.definition != record.latest().definition {
                record.versions.push(version);
            }
        }
        if let Some(name) = text(input.name, "name")? {
            record.name = name;
        }
        if let Some(d) = text(input.description, "description")? {
            record.description = d;
        }
        self.store(ws, &record).await?;
        Ok(record)
    }

    /// Deletes a definition; refused while another audience refers to it.
    pub async fn delete(&self, ws: &str, kind: Kind, id: &str) -> Result<(), DefinitionsError> {
        let record = self.get(ws, kind, id).await?;
        let audiences = self.list(ws, Kind::Audience).await?;
        for a in &audiences {
            let Ok(c) = condition_from_json(&a.latest().definition, "definition") else {
                continue;
            };
            let refers = match kind {
                Kind::Audience => c.audiences().contains(&record.key.as_str()),
                Kind::ComputedTrait => c.computed_traits().contains(&record.key.as_str()),
            };
            if refers && a.id != record.id {
                return Err(DefinitionError::new(
                    "id",
                    format!("the audience {:?} refers to it", a.key),
                )
                .into());
            }
        }
        self.directory
            .put_setting(ws, &kind.setting(id), None)
            .await?;
        Ok(())
    }

    async fn store(&self, ws: &str, record: &DefinitionRecord) -> Result<(), StoreError> {
        let text = serde_json::to_string(record).expect("definition serialises");
        self.directory
            .put_setting(ws, &record.kind.setting(&record.id), Some(&text))
            .await
    }

    /// Reads, checks and canonicalises a version of `key`'s definition.
    async fn checked_version(
        &self,
        ws: &str,
        kind: Kind,
        key: &str,
        input: &DefinitionInput,
        version: u32,
        now: i64,
    ) -> Result<VersionRecord, DefinitionsError> {
        let (definition, query) = match (kind, &input.definition, &input.query) {
            (_, Some(_), Some(_)) => {
                return Err(
                    DefinitionError::new("query", "give definition or query, not both").into(),
                );
            }
            (_, None, None) => {
                return Err(DefinitionError::new("definition", "required (or query)").into());
            }
            (Kind::ComputedTrait, None, Some(_)) => {
                return Err(DefinitionError::new(
                    "query",
                    "a computed trait is defined in JSON only",
                )
                .into());
            }
            (Kind::Audience, None, Some(q)) => {
                (condition_to_json(&parse_query(q)?), Some(q.clone()))
            }
            (Kind::Audience, Some(d), None) => (
                condition_to_json(&condition_from_json(d, "definition")?),
                None,
            ),
            (Kind::ComputedTrait, Some(d), None) => (
                computed_trait_to_json(&computed_trait_from_json(d, "definition")?),
                None,
            ),
        };
        // References are checked against every other definition's newest
        // version, with this one in place.
        let mut audiences: BTreeMap<String, Condition> = BTreeMap::new();
        for r in self.list(ws, Kind::Audience).await? {
            if let Ok(c) = condition_from_json(&r.latest().definition, "definition") {
                audiences.insert(r.key, c);
            }
        }
        let mut traits: BTreeSet<String> = self
            .list(ws, Kind::ComputedTrait)
            .await?
            .into_iter()
            .map(|r| r.key)
            .collect();
        match kind {
            Kind::Audience => {
                let c = condition_from_json(&definition, "definition")?;
                audiences.insert(key.to_owned(), c);
                let path = if query.is_some() {
                    "query"
                } else {
                    "definition"
                };
                check_references(&audiences, &traits, key, path)?;
            }
            Kind::ComputedTrait => {
                traits.insert(key.to_owned());
            }
        }
        Ok(VersionRecord {
            version,
            definition,
            query,
            created_at: now,
        })
    }
}

fn text(v: Option<String>, field: &str) -> Result<Option<String>, DefinitionError> {
    match v {
        Some(t) if t.len() > MAX_TEXT => Err(DefinitionError::new(
            field,
            format!("at most {MAX_TEXT} bytes"),
        )),
        other => Ok(other),
    }
}

/// A workspace's definitions compiled at chosen versions: what the
/// evaluator runs. Definitions that no longer compile (or refer to what is
/// gone) are left out, with an error logged.
pub fn compile(
    audiences: &[(DefinitionRecord, u32)],
    traits: &[(DefinitionRecord, u32)],
) -> Catalog {
    let version_of = |r: &DefinitionRecord, v: u32| {
        r.versions
            .iter()
            .find(|x| x.version == v)
            .cloned()
            .unwrap_or_else(|| r.latest().clone())
    };
    let traits: Vec<TraitDef> = traits
        .iter()
        .filter_map(|(r, v)| {
            let ver = version_of(r, *v);
            let definition: ComputedTrait =
                computed_trait_from_json(&ver.definition, "definition").ok()?;
            Some(TraitDef {
                id: r.id.clone(),
                key: r.key.clone(),
                version: ver.version,
                definition,
            })
        })
        .collect();
    let trait_keys: BTreeSet<String> = traits.iter().map(|t| t.key.clone()).collect();
    let mut conditions: BTreeMap<String, (DefinitionRecord, u32, Condition)> = BTreeMap::new();
    for (r, v) in audiences {
        let ver = version_of(r, *v);
        match condition_from_json(&ver.definition, "definition") {
            Ok(c) => {
                conditions.insert(r.key.clone(), (r.clone(), ver.version, c));
            }
            Err(e) => tracing::error!(id = %r.id, error = %e, "stored audience does not compile"),
        }
    }
    // Drop any audience whose references do not hold at these versions
    // (and, in turn, those referring to it).
    loop {
        let by_key: BTreeMap<String, Condition> = conditions
            .iter()
            .map(|(k, (_, _, c))| (k.clone(), c.clone()))
            .collect();
        let bad: Vec<String> = by_key
            .keys()
            .filter(|k| check_references(&by_key, &trait_keys, k, "definition").is_err())
            .cloned()
            .collect();
        if bad.is_empty() {
            break;
        }
        for k in bad {
            tracing::error!(key = %k, "audience refers to something missing or in a cycle; not evaluated");
            conditions.remove(&k);
        }
    }
    let audiences = conditions
        .into_values()
        .map(|(r, version, condition)| AudienceDef {
            id: r.id,
            key: r.key,
            version,
            condition,
        })
        .collect();
    Catalog::new(audiences, traits)
}
