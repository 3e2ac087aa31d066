//! The reader side of the embedded store: resolving a profile from the
//! evidence, and reading its traits, counts and timeline from one snapshot;
//! [`ProfileReader`] for [`EmbeddedStore`].

use super::directory::settings_key;
use super::*;

impl Inner {
    // ---- reads ----------------------------------------------------------

    /// The identity rules of a workspace: its settings, else the defaults.
    pub(super) fn rules(&self, ws: &str) -> Result<Arc<Rules>> {
        if let Some(r) = self.rules.read().expect("rules lock").get(ws) {
            return Ok(r.clone());
        }
        let rules = match self.stored_rules(ws)? {
            Some(s) => {
                Rules::from_settings(&s).map_err(|e| corrupt(&format!("identity rules: {e}")))?
            }
            None => Rules::default(),
        };
        let rules = Arc::new(rules);
        self.rules
            .write()
            .expect("rules lock")
            .insert(ws.to_owned(), rules.clone());
        Ok(rules)
    }

    pub(super) fn stored_rules(&self, ws: &str) -> Result<Option<RuleSettings>> {
        match self
            .ks
            .settings
            .get(settings_key(ws, "identity_rules"))
            .map_err(unavailable)?
        {
            Some(v) => Ok(Some(from_json(&v, "identity rules")?)),
            None => Ok(None),
        }
    }

    pub(super) fn resolve(&self, ws: &str, id: &Identifier) -> Result<Option<ProfileRef>> {
        let ks = &self.ks;
        let snap = self.db.snapshot();
        let named = |id: &Identifier| -> Result<Option<Named>> {
            snap.get(&ks.identity, ws_id_key(ws, id))
                .map_err(unavailable)?
                .map(|v| decode_named(&v))
                .transpose()
        };
        if named(id)?.is_none() {
            return Ok(None);
        }
        let rules = self.rules(ws)?;
        let mut walk = Walk::new(&rules, id.clone());
        loop {
            let next = walk.wanted();
            if next.is_empty() {
                break;
            }
            for i in next {
                let evidence = snap
                    .prefix(&ks.evidence, ws_id_key(ws, &i))
                    .take(MAX_ID_EVIDENCE + 1)
                    .map(|kv| decode_evidence(&kv.value().map_err(unavailable)?))
                    .collect::<Result<Vec<_>>>()?;
                walk.add(evidence);
            }
        }
        let resolved = walk.finish();
        let mut records = BTreeMap::new();
        for m in &resolved.members {
            if let Some(n) = named(m)? {
                records.insert(m.clone(), n);
            }
        }
        profile_ref(ws, resolved, records).map(Some)
    }

    pub(super) fn identifier_of(
        &self,
        ws: &str,
        profile_id: uuid::Uuid,
    ) -> Result<Option<Identifier>> {
        let mut key = ws_key(ws);
        key.extend_from_slice(profile_id.as_bytes());
        match self.ks.profile_ids.get(key).map_err(unavailable)? {
            Some(v) => Ok(Some(take_id(&v)?.0)),
            None => Ok(None),
        }
    }

    /// A page of one side of the memberships: the rows of `ks` under
    /// `owner`, in key order, after `after`.
    pub(super) fn memberships(
        &self,
        ks: Ks,
        ws: &str,
        owner: &Identifier,
        after: Option<&Identifier>,
        limit: usize,
    ) -> Result<Vec<(Identifier, Named)>> {
        use std::ops::Bound;
        let prefix = ws_id_key(ws, owner);
        let start = match after {
            Some(a) => {
                let mut k = prefix.clone();
                keys::push_id(&mut k, a);
                Bound::Excluded(k)
            }
            None => Bound::Included(prefix.clone()),
        };
        // Keys are UTF-8 and escapes, which never hold 0xff.
        let mut end = prefix.clone();
        end.push(0xff);
        let mut out = Vec::new();
        for kv in self
            .ks
            .get(ks)
            .range::<Vec<u8>, _>((start, Bound::Excluded(end)))
            .take(limit)
        {
            let (k, v) = kv.into_inner().map_err(unavailable)?;
            let (other, _) = take_id(&k[prefix.len()..])?;
            out.push((other, decode_named(&v)?));
        }
        Ok(out)
    }
}

impl Inner {
    pub(super) fn traits(
        &self,
        ws: &str,
        profile: &ProfileRef,
    ) -> Result<BTreeMap<String, TraitValue>> {
        let snap = self.db.snapshot();
        let mut out = BTreeMap::new();
        for id in profile.identifiers.keys() {
            let prefix = ws_id_key(ws, id);
            for kv in snap.prefix(&self.ks.traits, &prefix) {
                let (k, v) = kv.into_inner().map_err(unavailable)?;
                let name = String::from_utf8(k[prefix.len()..].to_vec())
                    .map_err(|_| corrupt("trait name"))?;
                merge_trait(&mut out, name, from_json(&v, "trait row")?);
            }
        }
        Ok(out)
    }

    pub(super) fn metadata(&self, ws: &str, profile: &ProfileRef) -> Result<ProfileMetadata> {
        let snap = self.db.snapshot();
        let mut meta = ProfileMetadata {
            first_seen: i64::MAX,
            last_seen: i64::MIN,
            counts: BTreeMap::new(),
        };
        for id in profile.identifiers.keys() {
            if let Some(v) = snap
                .get(&self.ks.stats, ws_id_key(ws, id))
                .map_err(unavailable)?
            {
                let (seen, counts) = decode_stats(&v)?;
                meta.first_seen = meta.first_seen.min(seen.first);
                meta.last_seen = meta.last_seen.max(seen.last);
                for (name, n) in counts {
                    *meta.counts.entry(name).or_default() += n;
                }
            }
        }
        if meta.first_seen == i64::MAX {
            meta.first_seen = 0;
            meta.last_seen = 0;
        }
        Ok(meta)
    }

    pub(super) fn timeline(
        &self,
        ws: &str,
        profile: &ProfileRef,
        q: &TimelineQuery,
    ) -> Result<TimelinePage> {
        let snap = self.db.snapshot();
        let limit = q.limit.max(1);
        // One ordered stream per identifier, merged by (time, messageId).
        let mut streams = Vec::new();
        for id in profile.identifiers.keys() {
            let prefix = ws_id_key(ws, id);
            let mut lo = prefix.clone();
            lo.extend_from_slice(&time_bytes(q.start.unwrap_or(i64::MIN)));
            let mut hi = prefix.clone();
            match q.end {
                Some(end) => hi.extend_from_slice(&time_bytes(end)),
                None => hi.extend_from_slice(&[0xff; 9]),
            }
            if let Some((t, m)) = &q.after {
                let mut cursor = prefix.clone();
                cursor.extend_from_slice(&time_bytes(*t));
                cursor.extend_from_slice(m.as_bytes());
                if q.descending {
                    if cursor < hi {
                        hi = cursor;
                    }
                } else {
                    // Exclusive of the cursor itself: the next possible key.
                    cursor.push(0);
                    if cursor > lo {
                        lo = cursor;
                    }
                }
            }
            if lo >= hi {
                continue;
            }
            let iter = snap.range(&self.ks.timeline, lo..hi);
            let iter: Box<dyn Iterator<Item = fjall::Guard>> = if q.descending {
                Box::new(iter.rev())
            } else {
                Box::new(iter)
            };
            streams.push((prefix.len(), iter.peekable_rows()));
        }
        let mut entries = Vec::new();
        let mut has_more = false;
        loop {
            // Pick the stream whose head comes first in the asked order.
            for s in streams.iter_mut() {
                s.1.peek()?;
            }
            let mut best: Option<usize> = None;
            for (i, s) in streams.iter().enumerate() {
                let Some(head) = s.1.head.as_ref() else {
                    continue;
                };
                best = match best {
                    None => Some(i),
                    Some(b) => {
                        let a = &head.0[s.0..];
                        let c = &streams[b].1.head.as_ref().expect("filled").0[streams[b].0..];
                        let first = if q.descending { a > c } else { a < c };
                        Some(if first { i } else { b })
                    }
                };
            }
            let Some(b) = best else { break };
            let plen = streams[b].0;
            let (key, value) = streams[b].1.next_row()?.expect("peeked");
            let (counter, body) = split_timeline_value(&value)?;
            if let Some(want) = &q.event
                && counter != want.as_bytes()
            {
                continue;
            }
            if entries.len() == limit {
                has_more = true;
                break;
            }
            let suffix = &key[plen..];
            let (time, message_id) = suffix
                .split_at_checked(8)
                .ok_or_else(|| corrupt("timeline key"))?;
            let time = time_from(time)?;
            let message_id =
                String::from_utf8(message_id.to_vec()).map_err(|_| corrupt("message id"))?;
            let text = String::from_utf8(body.to_vec()).map_err(|_| corrupt("timeline json"))?;
            let json = RawValue::from_string(text).map_err(|_| corrupt("timeline json"))?;
            entries.push(TimelineEntry {
                time,
                message_id,
                json,
            });
        }
        Ok(TimelinePage { entries, has_more })
    }
}

/// A one-row look-ahead over a fjall iterator whose rows may fail to read.
struct PeekableRows<I: Iterator<Item = fjall::Guard>> {
    inner: I,
    head: Option<(Vec<u8>, Vec<u8>)>,
}

trait PeekableRowsExt: Iterator<Item = fjall::Guard> + Sized {
    fn peekable_rows(self) -> PeekableRows<Self> {
        PeekableRows {
            inner: self,
            head: None,
        }
    }
}

impl<I: Iterator<Item = fjall::Guard>> PeekableRowsExt for I {}

impl<I: Iterator<Item = fjall::Guard>> PeekableRows<I> {
    fn peek(&mut self) -> Result<Option<&(Vec<u8>, Vec<u8>)>> {
        if self.head.is_none()
            && let Some(g) = self.inner.next()
        {
            let (k, v) = g.into_inner().map_err(unavailable)?;
            self.head = Some((k.to_vec(), v.to_vec()));
        }
        Ok(self.head.as_ref())
    }

    fn next_row(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.peek()?;
        Ok(self.head.take())
    }
}

#[async_trait]
impl ProfileReader for EmbeddedStore {
    async fn resolve(&self, workspace: &str, id: &Identifier) -> Result<Option<ProfileRef>> {
        self.inner.resolve(workspace, id)
    }

    async fn identifier_of(
        &self,
        workspace: &str,
        profile_id: uuid::Uuid,
    ) -> Result<Option<Identifier>> {
        self.inner.identifier_of(workspace, profile_id)
    }

    async fn account_members(
        &self,
        workspace: &str,
        account: &Identifier,
        after: Option<&Identifier>,
        limit: usize,
    ) -> Result<Vec<(Identifier, Named)>> {
        self.inner
            .memberships(Ks::AccountMembers, workspace, account, after, limit)
    }

    async fn member_accounts(
        &self,
        workspace: &str,
        member: &Identifier,
        after: Option<&Identifier>,
        limit: usize,
    ) -> Result<Vec<(Identifier, Named)>> {
        self.inner
            .memberships(Ks::MemberAccounts, workspace, member, after, limit)
    }

    async fn traits(
        &self,
        workspace: &str,
        profile: &ProfileRef,
    ) -> Result<BTreeMap<String, TraitValue>> {
        self.inner.traits(workspace, profile)
    }

    async fn metadata(&self, workspace: &str, profile: &ProfileRef) -> Result<ProfileMetadata> {
        self.inner.metadata(workspace, profile)
    }

    async fn timeline(
        &self,
        workspace: &str,
        profile: &ProfileRef,
        query: &TimelineQuery,
    ) -> Result<TimelinePage> {
        let (ws, profile, query) = (workspace.to_owned(), profile.clone(), query.clone());
        self.blocking(move |inner| inner.timeline(&ws, &profile, &query))
            .await
    }

    async fn check_ready(&self) -> Result<()> {
        // A read through the journal-backed keyspaces fails once fjall has
        // poisoned itself after a fatal IO error.
        self.inner
            .ks
            .workspaces
            .contains_key(b"readyz")
            .map(|_| ())
            .map_err(unavailable)
    }
}
