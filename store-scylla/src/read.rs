//! The reader side: resolving identities, and reading traits, metadata and
//! timelines, as [`ProfileReader`] for [`ScyllaStore`].

use super::*;

/// One identifier's timeline rows, as read.
struct Row {
    time: i64,
    message_id: String,
    counter: String,
    body: String,
}

impl ScyllaStore {
    /// A page of one side of the memberships (`0` an account's members, `1`
    /// a member's accounts), in clustering order, after `after`.
    async fn memberships(
        &self,
        side: usize,
        ws: &str,
        owner: &Identifier,
        after: Option<&Identifier>,
        limit: usize,
    ) -> Result<Vec<(Identifier, Named)>> {
        type R = (
            String,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<Vec<u8>>,
        );
        // Every stored id holds a NUL, so '' sorts before all of them.
        let after = after.map(id_text).unwrap_or_default();
        let n = limit.clamp(1, i32::MAX as usize) as i32;
        let rows: Vec<R> = self
            .rows(
                &self.st.memberships[side].page,
                (ws, id_text(owner), after, n),
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (other, created, last_seen, received_at, first) in rows {
            // A row whose cells are not all written yet (a write cut short,
            // to be completed by the replay) is not shown.
            let (Some(created), Some(last_seen), Some(received_at), Some(first)) =
                (created, last_seen, received_at, first)
            else {
                continue;
            };
            let (message_id, source_id) = decode_first(&first)?;
            out.push((
                parse_id(&other)?,
                Named {
                    created,
                    last_seen,
                    first: Key {
                        received_at,
                        message_id,
                    },
                    source_id,
                },
            ));
        }
        Ok(out)
    }

    /// Reads rows of one bucket after `cursor` in the query's direction.
    async fn scan_bucket(
        &self,
        ws: &str,
        id: &str,
        bucket: i64,
        q: &TimelineQuery,
        cursor: Option<&(i64, String)>,
        limit: usize,
    ) -> Result<Vec<Row>> {
        let st = &self.st;
        let lo = q.start.unwrap_or(i64::MIN);
        let hi = q.end.unwrap_or(i64::MAX);
        let n = limit.min(i32::MAX as usize) as i32;
        type R = (i64, String, String, String);
        let rows: Vec<R> = match (q.descending, cursor) {
            (false, Some((t, m))) if *t >= lo => {
                self.rows(&st.timeline_asc_after, (ws, id, bucket, *t, m, hi, n))
                    .await?
            }
            (false, _) => {
                self.rows(&st.timeline_asc_from, (ws, id, bucket, lo, hi, n))
                    .await?
            }
            (true, Some((t, m))) if *t < hi => {
                self.rows(&st.timeline_desc_before, (ws, id, bucket, lo, *t, m, n))
                    .await?
            }
            (true, _) => {
                self.rows(&st.timeline_desc_from, (ws, id, bucket, lo, hi, n))
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(time, message_id, counter, body)| Row {
                time,
                message_id,
                counter,
                body,
            })
            .collect())
    }

    /// The first `want` matching rows of one identifier's timeline, in the
    /// query's order, walking its buckets.
    async fn identifier_timeline(
        &self,
        ws: &str,
        id: &str,
        q: &TimelineQuery,
        want: usize,
    ) -> Result<Vec<Row>> {
        let mut lo = bucket_of(q.start.unwrap_or(i64::MIN));
        let mut hi = bucket_of(q.end.map(|e| e.saturating_sub(1)).unwrap_or(i64::MAX));
        if let Some((t, _)) = &q.after {
            if q.descending {
                hi = hi.min(bucket_of(*t));
            } else {
                lo = lo.max(bucket_of(*t));
            }
        }
        if lo > hi {
            return Ok(Vec::new());
        }
        let st = if q.descending {
            &self.st.buckets_desc
        } else {
            &self.st.buckets_asc
        };
        let buckets: Vec<(i64,)> = self.rows(st, (ws, id, lo, hi)).await?;
        let mut out = Vec::new();
        let mut cursor = q.after.clone();
        for (bucket,) in buckets {
            loop {
                let need = want - out.len();
                // A filter is applied here, so read more per round trip.
                let fetch = if q.event.is_some() {
                    need.max(500)
                } else {
                    need
                };
                let rows = self
                    .scan_bucket(ws, id, bucket, q, cursor.as_ref(), fetch)
                    .await?;
                let got = rows.len();
                for r in rows {
                    cursor = Some((r.time, r.message_id.clone()));
                    if q.event.as_deref().is_none_or(|e| e == r.counter) {
                        out.push(r);
                        if out.len() == want {
                            return Ok(out);
                        }
                    }
                }
                if got < fetch {
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl ProfileReader for ScyllaStore {
    async fn account_members(
        &self,
        workspace: &str,
        account: &Identifier,
        after: Option<&Identifier>,
        limit: usize,
    ) -> Result<Vec<(Identifier, Named)>> {
        self.memberships(0, workspace, account, after, limit).await
    }

    async fn member_accounts(
        &self,
        workspace: &str,
        member: &Identifier,
        after: Option<&Identifier>,
        limit: usize,
    ) -> Result<Vec<(Identifier, Named)>> {
        self.memberships(1, workspace, member, after, limit).await
    }

    async fn resolve(&self, workspace: &str, id: &Identifier) -> Result<Option<ProfileRef>> {
        if self.named(workspace, id).await?.is_none() {
            return Ok(None);
        }
        // The walk asks for a wave of identifiers at a time; each wave is
        // read concurrently.
        let rules = self.rules(workspace).await?;
        let mut walk = Walk::new(&rules, id.clone());
        loop {
            let next = walk.wanted();
            if next.is_empty() {
                break;
            }
            let reads: Vec<_> = next.iter().map(|i| self.evidence(workspace, i)).collect();
            for evidence in concurrently(reads).await? {
                walk.add(evidence);
            }
        }
        let resolved = walk.finish();
        if resolved.too_large {
            tracing::debug!(
                workspace,
                "identifier in an oversized component stands alone"
            );
        }
        let reads: Vec<_> =
            resolved
                .members
                .iter()
                .map(|m| async move {
                    Ok::<_, StoreError>((m.clone(), self.named(workspace, m).await?))
                })
                .collect();
        let records: BTreeMap<Identifier, Named> = concurrently(reads)
            .await?
            .into_iter()
            .filter_map(|(m, n)| n.map(|n| (m, n)))
            .collect();
        profile_ref(workspace, resolved, records).map(Some)
    }

    async fn identifier_of(
        &self,
        workspace: &str,
        profile_id: uuid::Uuid,
    ) -> Result<Option<Identifier>> {
        let rows: Vec<(String,)> = self
            .rows(&self.st.select_profile_id, (workspace, profile_id))
            .await?;
        rows.into_iter().next().map(|(t,)| parse_id(&t)).transpose()
    }

    async fn traits(
        &self,
        workspace: &str,
        profile: &ProfileRef,
    ) -> Result<BTreeMap<String, TraitValue>> {
        let mut reads = Vec::new();
        for id in profile.identifiers.keys() {
            let id = id_text(id);
            reads.push(async move {
                self.rows::<(String, Vec<u8>)>(&self.st.select_traits, (workspace, id))
                    .await
            });
        }
        let per_id = concurrently(reads).await?;
        let mut out = BTreeMap::new();
        for (name, cell) in per_id.into_iter().flatten() {
            merge_trait(&mut out, name, decode_trait(&cell)?);
        }
        Ok(out)
    }

    async fn metadata(&self, workspace: &str, profile: &ProfileRef) -> Result<ProfileMetadata> {
        let mut reads = Vec::new();
        for id in profile.identifiers.keys() {
            let id = id_text(id);
            reads.push(async move { self.read_stats(workspace, &id).await });
        }
        let rows = concurrently(reads).await?;
        let mut meta = ProfileMetadata {
            first_seen: i64::MAX,
            last_seen: i64::MIN,
            counts: BTreeMap::new(),
        };
        for row in rows {
            if let Some(seen) = row.seen {
                meta.first_seen = meta.first_seen.min(seen.first);
                meta.last_seen = meta.last_seen.max(seen.last);
            }
            for (name, n) in row.counts {
                *meta.counts.entry(name).or_default() += n.max(0) as u64;
            }
        }
        if meta.first_seen == i64::MAX {
            meta.first_seen = 0;
            meta.last_seen = 0;
        }
        Ok(meta)
    }

    async fn timeline(
        &self,
        workspace: &str,
        profile: &ProfileRef,
        query: &TimelineQuery,
    ) -> Result<TimelinePage> {
        let limit = query.limit.max(1);
        let mut reads = Vec::new();
        for id in profile.identifiers.keys() {
            let id = id_text(id);
            reads.push(async move {
                self.identifier_timeline(workspace, &id, query, limit + 1)
                    .await
            });
        }
        let per_id = concurrently(reads).await?;
        let mut rows: Vec<Row> = per_id.into_iter().flatten().collect();
        rows.sort_by(|a, b| (a.time, &a.message_id).cmp(&(b.time, &b.message_id)));
        if query.descending {
            rows.reverse();
        }
        let has_more = rows.len() > limit;
        rows.truncate(limit);
        let entries = rows
            .into_iter()
            .map(|r| {
                Ok(TimelineEntry {
                    time: r.time,
                    message_id: r.message_id,
                    json: RawValue::from_string(r.body).map_err(|_| corrupt("timeline json"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(TimelinePage { entries, has_more })
    }

    async fn check_ready(&self) -> Result<()> {
        let rows: Vec<(i32,)> = self
            .rows(&self.st.ready, (schema::current_version(),))
            .await?;
        if rows.is_empty() {
            return Err(StoreError::Unavailable("store schema is missing".into()));
        }
        Ok(())
    }
}
