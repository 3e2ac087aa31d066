//! The writer side: how a batch of events becomes idempotent CQL writes
//! (the module doc of the crate says why each is idempotent), and
//! [`ProfileWriter`] for [`ScyllaStore`].

use super::*;

/// A write of the fold, issued concurrently with the others.
enum Write {
    /// An identifier's record: its three cells and its `profile_ids` row.
    Named {
        ws: String,
        id: Identifier,
        named: Named,
    },
    /// A piece of evidence under one identifier.
    Evidence {
        ws: String,
        id: String,
        slot: [u8; 16],
        evidence: Evidence,
    },
    Trait {
        ws: String,
        id: String,
        name: String,
        value: TraitValue,
    },
    Timeline {
        ws: String,
        id: String,
        time: i64,
        message_id: String,
        counter: String,
        body: String,
    },
    Bucket {
        ws: String,
        id: String,
        bucket: i64,
    },
    Stats {
        ws: String,
        id: String,
        row: StatsRow,
    },
    /// A membership, under the account and under the member.
    Member {
        ws: String,
        account: String,
        member: String,
        named: Named,
    },
}

/// A `stats` row: seen times, counts, and how far each partition is included.
#[derive(Debug, Clone, Default)]
pub(crate) struct StatsRow {
    pub(crate) seen: Option<Seen>,
    pub(crate) counts: BTreeMap<String, i64>,
    applied: BTreeMap<i32, i64>,
}

impl StatsRow {
    /// Folds in the event at `position` of `partition`, unless the row
    /// already includes it (counted before a crash cut a batch short).
    /// Returns whether the row changed.
    fn count(&mut self, partition: u32, position: u64, counter: String, time: i64) -> bool {
        let (partition, position) = (partition as i32, position as i64);
        if self
            .applied
            .get(&partition)
            .is_some_and(|next| *next > position)
        {
            return false;
        }
        self.seen = Some(match self.seen {
            Some(s) => s.include(time),
            None => Seen {
                first: time,
                last: time,
            },
        });
        *self.counts.entry(counter).or_default() += 1;
        self.applied.insert(partition, position + 1);
        true
    }

    /// The row's write timestamp: the sum of its partitions' positions, which
    /// grows with every event folded in. A projector that lost its partition
    /// (evicted during a long stall) but still writes folds fewer events than
    /// the one that took over, so its late write loses instead of erasing
    /// counts; and coordinators' clocks never order these writes.
    fn fence(&self) -> i64 {
        self.applied
            .values()
            .fold(0i64, |a, p| a.saturating_add(*p))
    }
}

impl ScyllaStore {
    async fn run(&self, w: Write) -> Result<()> {
        let st = &self.st;
        match w {
            Write::Named { ws, id, named } => {
                let text = id_text(&id);
                let pid = profile_id(&ws, &id);
                let first = encode_first(&named);
                futures_util::future::try_join4(
                    self.write(
                        &st.named_created,
                        (
                            first_seen_timestamp(named.created),
                            named.created,
                            &ws,
                            &text,
                        ),
                    ),
                    self.write(
                        &st.named_last,
                        (
                            trait_timestamp(named.last_seen),
                            named.last_seen,
                            &ws,
                            &text,
                        ),
                    ),
                    self.write(
                        &st.named_first,
                        (
                            first_seen_timestamp(named.first.received_at),
                            named.first.received_at,
                            first,
                            &ws,
                            &text,
                        ),
                    ),
                    self.write(&st.insert_profile_id, (&ws, pid, &text)),
                )
                .await?;
                Ok(())
            }
            Write::Evidence {
                ws,
                id,
                slot,
                evidence,
            } => {
                let ts = first_seen_timestamp(evidence.key.received_at);
                self.write(
                    &st.upsert_evidence,
                    (ts, encode_evidence(&evidence), ws, id, slot.to_vec()),
                )
                .await
            }
            Write::Trait {
                ws,
                id,
                name,
                value,
            } => {
                let ts = trait_timestamp(value.updated_at);
                self.write(&st.upsert_trait, (ts, encode_trait(&value), ws, id, name))
                    .await
            }
            Write::Timeline {
                ws,
                id,
                time,
                message_id,
                counter,
                body,
            } => {
                self.write(
                    &st.insert_timeline,
                    (ws, id, bucket_of(time), time, message_id, counter, body),
                )
                .await
            }
            Write::Member {
                ws,
                account,
                member,
                named,
            } => {
                let [to_members, to_accounts] = &st.memberships;
                futures_util::future::try_join(
                    self.write_membership(to_members, &ws, &account, &member, &named),
                    self.write_membership(to_accounts, &ws, &member, &account, &named),
                )
                .await?;
                Ok(())
            }
            Write::Bucket { ws, id, bucket } => {
                self.write(&st.insert_bucket, (ws, id, bucket)).await
            }
            Write::Stats { ws, id, row } => {
                let seen = row.seen.unwrap_or(Seen { first: 0, last: 0 });
                let fence = row.fence();
                self.write(
                    &st.upsert_stats,
                    (
                        ws,
                        id,
                        seen.first,
                        seen.last,
                        row.counts,
                        row.applied,
                        fence,
                    ),
                )
                .await
            }
        }
    }

    /// One side of a membership: its three cells, each kept by its write
    /// timestamp as an identifier's are.
    async fn write_membership(
        &self,
        m: &Membership,
        ws: &str,
        owner: &str,
        other: &str,
        named: &Named,
    ) -> Result<()> {
        futures_util::future::try_join3(
            self.write(
                &m.created,
                (
                    first_seen_timestamp(named.created),
                    named.created,
                    ws,
                    owner,
                    other,
                ),
            ),
            self.write(
                &m.last,
                (
                    trait_timestamp(named.last_seen),
                    named.last_seen,
                    ws,
                    owner,
                    other,
                ),
            ),
            self.write(
                &m.first,
                (
                    first_seen_timestamp(named.first.received_at),
                    named.first.received_at,
                    encode_first(named),
                    ws,
                    owner,
                    other,
                ),
            ),
        )
        .await?;
        Ok(())
    }

    async fn run_all(&self, writes: Vec<Write>) -> Result<()> {
        let mut futures = Vec::with_capacity(writes.len());
        for w in writes {
            futures.push(self.run(w));
        }
        concurrently(futures).await?;
        Ok(())
    }

    pub(crate) async fn read_stats(&self, ws: &str, id: &str) -> Result<StatsRow> {
        type Row = (
            Option<i64>,
            Option<i64>,
            Option<BTreeMap<String, i64>>,
            Option<BTreeMap<i32, i64>>,
        );
        let rows: Vec<Row> = self.rows(&self.st.select_stats, (ws, id)).await?;
        Ok(match rows.into_iter().next() {
            None => StatsRow::default(),
            Some((first, last, counts, applied)) => StatsRow {
                seen: first.zip(last).map(|(first, last)| Seen { first, last }),
                counts: counts.unwrap_or_default(),
                applied: applied.unwrap_or_default(),
            },
        })
    }

    /// The `(workspace, messageId) → receivedAt` rows of the batch's
    /// messages, as `consumer` saw them.
    pub(crate) async fn read_dedup(
        &self,
        consumer: &str,
        keys: HashSet<(String, String)>,
    ) -> Result<HashMap<(String, String), i64>> {
        let mut reads = Vec::with_capacity(keys.len());
        for (ws, mid) in keys {
            reads.push(async move {
                let rows: Vec<(i64,)> = self
                    .rows(&self.st.select_dedup, (consumer, &ws, &mid))
                    .await?;
                Ok::<_, StoreError>(rows.first().map(|r| ((ws, mid), r.0)))
            });
        }
        let found = concurrently(reads).await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// Forgets which messages were applied, as if the process had died after
    /// writing a batch's effects but before its de-duplication rows. Only for
    /// tests of the replay path.
    #[doc(hidden)]
    pub async fn forget_applied_messages_for_test(&self) -> Result<()> {
        self.session
            .query_unpaged(qualify("TRUNCATE consumer_dedup", &self.keyspace), ())
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// The identity rules of every workspace among `events`.
    async fn rules_for(&self, events: &[&LoggedEvent]) -> Result<RulesByWorkspace> {
        let mut out = RulesByWorkspace::new();
        for le in events {
            let ws = &le.event.workspace_id;
            if !out.contains_key(ws) {
                out.insert(ws.clone(), self.rules(ws).await?);
            }
        }
        Ok(out)
    }

    /// An identifier's record, if any event named it.
    pub(crate) async fn named(&self, ws: &str, id: &Identifier) -> Result<Option<Named>> {
        type Row = (Option<i64>, Option<i64>, Option<i64>, Option<Vec<u8>>);
        let rows: Vec<Row> = self
            .rows(&self.st.select_identity, (ws, id_text(id)))
            .await?;
        let Some((Some(created), Some(last_seen), Some(received_at), Some(first))) =
            rows.into_iter().next()
        else {
            return Ok(None);
        };
        let (message_id, source_id) = decode_first(&first)?;
        Ok(Some(Named {
            created,
            last_seen,
            first: Key {
                received_at,
                message_id,
            },
            source_id,
        }))
    }

    /// The evidence kept under an identifier: all of it, or one more piece
    /// than an identifier may carry.
    pub(crate) async fn evidence(&self, ws: &str, id: &Identifier) -> Result<Vec<Evidence>> {
        let rows: Vec<(Option<Vec<u8>>,)> = self
            .rows(&self.st.select_evidence, (ws, id_text(id)))
            .await?;
        rows.into_iter()
            .filter_map(|(v,)| v)
            .map(|v| decode_evidence(&v))
            .collect()
    }
}

/// The writes of a batch's new events, coalesced: within a batch each
/// identifier's earliest time, each link, each trait's winner and each bucket
/// are written once (they are idempotent, so once is as good as many), and
/// each event's timeline row once. Counts are left to the caller, per primary
/// identifier: `(partition, position, counter, time)` in log order.
struct Plan {
    writes: Vec<Write>,
    by_primary: CountsByPrimary,
}

/// Per `(workspace, primary identifier)`: `(partition, position, counter,
/// time)` of each new event, in log order.
type CountsByPrimary = BTreeMap<(String, String), Vec<(u32, u64, String, i64)>>;

/// The identity rules of each workspace a batch touches.
type RulesByWorkspace = HashMap<String, Arc<Rules>>;

fn plan(events: &[&LoggedEvent], rules: &RulesByWorkspace) -> Result<Plan> {
    let mut writes = Vec::with_capacity(events.len() * 2);
    let mut by_primary = CountsByPrimary::new();
    let mut named: HashMap<(String, Identifier), Named> = HashMap::new();
    let mut evidence: HashMap<(String, String, [u8; 16]), Evidence> = HashMap::new();
    let mut traits: HashMap<(String, String, String), TraitValue> = HashMap::new();
    let mut buckets: HashSet<(String, String, i64)> = HashSet::new();
    let mut members: HashMap<(String, String, String), Named> = HashMap::new();
    for le in events {
        let ev = &le.event;
        let ws = &ev.workspace_id;
        for fact in project(ev)?.facts {
            match fact {
                Fact::Named { id, named: n } => match named.entry((ws.clone(), id)) {
                    std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().include(&n),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(n);
                    }
                },
                Fact::Linked(e) => {
                    let rules = rules
                        .get(ws)
                        .ok_or_else(|| StoreError::Invalid(format!("no rules for {ws}")))?;
                    let slot = slot_digest(&e.slot(rules));
                    for id in e.ids.iter().filter(|i| !rules.is_blocked(i)) {
                        // One piece per slot: the smallest key.
                        match evidence.entry((ws.clone(), id_text(id), slot)) {
                            std::collections::hash_map::Entry::Occupied(mut o) => {
                                if e.key < o.get().key {
                                    o.insert(e.clone());
                                }
                            }
                            std::collections::hash_map::Entry::Vacant(v) => {
                                v.insert(e.clone());
                            }
                        }
                    }
                }
                Fact::Trait { id, name, value } => {
                    match traits.entry((ws.clone(), id_text(&id), name)) {
                        std::collections::hash_map::Entry::Occupied(mut o) => {
                            if value.supersedes(o.get()) {
                                o.insert(value);
                            }
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(value);
                        }
                    }
                }
                Fact::Counted { id, counter, time } => {
                    by_primary
                        .entry((ws.clone(), id_text(&id)))
                        .or_default()
                        .push((le.partition, le.position, counter, time));
                }
                Fact::Timeline {
                    id,
                    time,
                    message_id,
                    counter,
                } => {
                    let id = id_text(&id);
                    buckets.insert((ws.clone(), id.clone(), bucket_of(time)));
                    let mut body = Vec::with_capacity(512);
                    ev.write_api_json(&mut body);
                    writes.push(Write::Timeline {
                        ws: ws.clone(),
                        id,
                        time,
                        message_id,
                        counter,
                        body: String::from_utf8(body).map_err(corrupt)?,
                    });
                }
                Fact::Member {
                    account,
                    member,
                    named: n,
                } => match members.entry((ws.clone(), id_text(&account), id_text(&member))) {
                    std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().include(&n),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(n);
                    }
                },
            }
        }
    }
    writes.extend(
        named
            .into_iter()
            .map(|((ws, id), named)| Write::Named { ws, id, named }),
    );
    writes.extend(
        evidence
            .into_iter()
            .map(|((ws, id, slot), evidence)| Write::Evidence {
                ws,
                id,
                slot,
                evidence,
            }),
    );
    writes.extend(
        traits
            .into_iter()
            .map(|((ws, id, name), value)| Write::Trait {
                ws,
                id,
                name,
                value,
            }),
    );
    writes.extend(
        buckets
            .into_iter()
            .map(|(ws, id, bucket)| Write::Bucket { ws, id, bucket }),
    );
    writes.extend(
        members
            .into_iter()
            .map(|((ws, account, member), named)| Write::Member {
                ws,
                account,
                member,
                named,
            }),
    );
    Ok(Plan { writes, by_primary })
}

impl ScyllaStore {
    /// Writes the rows `apply` would write for `events` (stats rows from the
    /// batch alone, de-duplication rows), blind: no reads, no decisions, no
    /// checkpoint. Only for the benchmark baseline, "a plain write loop of
    /// the same rows"; it does not keep the store's guarantees.
    #[doc(hidden)]
    pub async fn write_rows_blind_for_baseline(&self, events: &[LoggedEvent]) -> Result<()> {
        let refs: Vec<&LoggedEvent> = events.iter().collect();
        let rules = self.rules_for(&refs).await?;
        let Plan {
            mut writes,
            by_primary,
        } = plan(&refs, &rules)?;
        for ((ws, id), evs) in by_primary {
            let mut row = StatsRow::default();
            for (partition, position, counter, time) in evs {
                row.count(partition, position, counter, time);
            }
            writes.push(Write::Stats { ws, id, row });
        }
        self.run_all(writes).await?;
        let mut marks = Vec::with_capacity(events.len());
        for le in events {
            let ev = &le.event;
            marks.push(self.write(
                &self.st.insert_dedup,
                (
                    "baseline",
                    &ev.workspace_id,
                    &ev.message_id,
                    ev.received_at,
                    176_400,
                ),
            ));
        }
        concurrently(marks).await?;
        Ok(())
    }
}

#[async_trait]
impl ProfileWriter for ScyllaStore {
    async fn apply(&self, batch: Arc<ApplyBatch>) -> Result<ApplyOutcome> {
        let window = batch.dedup_window_micros;
        // 1. Which events are new: the stored rows, then the batch itself.
        let keys: HashSet<(String, String)> = batch
            .events
            .iter()
            .map(|e| (e.event.workspace_id.clone(), e.event.message_id.clone()))
            .collect();
        let mut latest = self.read_dedup(&batch.consumer, keys).await?;
        let mut outcome = ApplyOutcome::default();
        let mut fresh: Vec<&LoggedEvent> = Vec::with_capacity(batch.events.len());
        let mut dedup_rows: HashMap<(String, String), i64> = HashMap::new();
        for le in &batch.events {
            let ev = &le.event;
            let key = (ev.workspace_id.clone(), ev.message_id.clone());
            if is_duplicate(latest.get(&key).copied(), ev.received_at, window) {
                outcome.duplicates += 1;
                continue;
            }
            latest.insert(key.clone(), ev.received_at);
            dedup_rows.insert(key, ev.received_at);
            fresh.push(le);
        }
        outcome.applied = fresh.len();

        // 2. Their effects: blind writes, and counts folded per identifier.
        let rules = self.rules_for(&fresh).await?;
        let Plan { writes, by_primary } = plan(&fresh, &rules)?;
        let mut folds = Vec::with_capacity(by_primary.len());
        for ((ws, id), events) in by_primary {
            folds.push(async move {
                let mut row = self.read_stats(&ws, &id).await?;
                let mut changed = false;
                for (partition, position, counter, time) in events {
                    changed |= row.count(partition, position, counter, time);
                }
                Ok::<_, StoreError>(changed.then_some(Write::Stats { ws, id, row }))
            });
        }
        let stats = concurrently(folds).await?;
        self.run_all(writes).await?;
        // Counts last: if another write fails for good (and the event ends up
        // a dead letter), it has not been counted.
        self.run_all(stats.into_iter().flatten().collect()).await?;

        // 3. Only now: "this message is applied".
        let ttl = (window / 1_000_000)
            .saturating_mul(2)
            .saturating_add(3_600)
            .clamp(1, 630_720_000) as i32;
        let mut marks = Vec::with_capacity(dedup_rows.len());
        let consumer = batch.consumer.as_str();
        for ((ws, mid), received) in dedup_rows {
            marks.push(async move {
                self.write(&self.st.insert_dedup, (consumer, ws, mid, received, ttl))
                    .await
            });
        }
        concurrently(marks).await?;

        // 4. The checkpoints: one partition, so one unlogged batch.
        if !batch.positions.is_empty() {
            let mut b = Batch::new(BatchType::Unlogged);
            let mut values = Vec::new();
            for (partition, position) in &batch.positions {
                b.append_statement(self.st.upsert_checkpoint.clone());
                // Fenced by the position: a late write from a projector that
                // lost the partition never moves the checkpoint back.
                values.push((
                    batch.consumer.as_str(),
                    *partition as i32,
                    *position as i64,
                    *position as i64,
                ));
            }
            b.set_is_idempotent(true);
            self.session.batch(&b, values).await.map_err(classify)?;
        }
        Ok(outcome)
    }

    async fn checkpoints(&self, consumer: &str) -> Result<BTreeMap<u32, u64>> {
        let rows: Vec<(i32, i64)> = self.rows(&self.st.select_checkpoints, (consumer,)).await?;
        Ok(rows
            .into_iter()
            .map(|(p, pos)| (p as u32, pos as u64))
            .collect())
    }

    async fn reset_projections(&self) -> Result<()> {
        for table in schema::PROJECTION_TABLES {
            let mut st = Statement::new(qualify(&format!("TRUNCATE {table}"), &self.keyspace));
            st.set_request_timeout(Some(Duration::from_secs(60)));
            self.session.query_unpaged(st, ()).await.map_err(classify)?;
        }
        Ok(())
    }
}
