//! Profiles the evaluator has resolved, carried over later events while no
//! event could have changed them, so that an event of a known profile costs
//! no walk of its identity evidence.
//!
//! # Why a copy stays right
//! Only the projector changes identity, only by folding events, and the
//! evaluator reads every event it folds, after it folds it (a step waits for
//! the projector's checkpoints). A resolution read at some moment reflects
//! every event folded by then, and any change after it comes from an event
//! at or past the evaluator's position, which a later step reads. Each step
//! first shows this cache all of its events ([`Resolutions::observe`]),
//! then resolves: a profile whose member an event names stays only if
//! [`Settled::carry`] says the event leaves it as it was (a repeat of a link
//! it has, in canonical order); otherwise it is dropped and read again when
//! needed. A control record drops its workspace.
//!
//! Two changes come from outside the log: identity rules (workspace
//! settings), which the evaluator re-reads with its definitions and, when
//! they changed, drops the workspace ([`Resolutions::rules_read`]); and a
//! rebuild of the store, which restarts the evaluator too.
//!
//! A copy keeps what resolution says of membership and the holder; the
//! times in its members' [`trailmark_domain::profile::Named`] records are
//! those read, and its identity decisions are not kept (the evaluator reads
//! neither).

use std::collections::HashMap;
use std::sync::Arc;

use trailmark_domain::audience::EVALUATOR_SOURCE;
use trailmark_domain::identity::Settled;
use trailmark_domain::profile::project;
use trailmark_domain::{Event, IdKind, Identifier};
use trailmark_store::ProfileRef;
use uuid::Uuid;

/// The most identifiers held; past it, it starts again empty.
const MAX_IDS: usize = 400_000;
/// And the most bytes held, as [`entry_bytes`] counts them (a value may be
/// long).
const MAX_BYTES: usize = 128 << 20;

/// One carried profile.
struct Carried {
    profile: Arc<ProfileRef>,
    settled: Settled,
}

/// One workspace's carried profiles, and the member index over them.
#[derive(Default)]
struct Workspace {
    profiles: HashMap<Uuid, Carried>,
    by_id: HashMap<Identifier, Uuid>,
}

impl Workspace {
    /// Drops a profile and its members' entries, adding to `freed` what
    /// they held.
    fn drop_profile(&mut self, ws: &str, pid: Uuid, freed: &mut Freed) {
        if let Some(c) = self.profiles.remove(&pid) {
            for id in c.profile.identifiers.keys() {
                if self.by_id.get(id) == Some(&pid) {
                    self.by_id.remove(id);
                    freed.ids += 1;
                    freed.bytes += entry_bytes(ws, id);
                }
            }
        }
    }
}

/// Entries dropped, and the bytes they held.
#[derive(Default)]
struct Freed {
    ids: usize,
    bytes: usize,
}

/// The cache. One evaluator loop owns it.
#[derive(Default)]
pub(crate) struct Resolutions {
    workspaces: HashMap<String, Workspace>,
    /// Identifiers held, over every workspace.
    ids: usize,
    /// Bytes held, as [`entry_bytes`] counts them.
    bytes: usize,
    /// The identity rules each workspace had when last read (as JSON).
    rules: HashMap<String, String>,
    hits: u64,
    misses: u64,
}

impl Resolutions {
    /// `id`'s profile, if carried.
    pub(crate) fn get(&mut self, ws: &str, id: &Identifier) -> Option<Arc<ProfileRef>> {
        let found = self.workspaces.get(ws).and_then(|w| {
            let pid = w.by_id.get(id)?;
            Some(w.profiles.get(pid)?.profile.clone())
        });
        if found.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        found
    }

    /// Keeps a profile just resolved, under each of its members, if it can
    /// be carried (it is its whole component).
    pub(crate) fn insert(&mut self, ws: &str, profile: &ProfileRef) {
        let Some(settled) = profile.settled.clone() else {
            return;
        };
        if self.ids + profile.identifiers.len() > MAX_IDS || self.bytes > MAX_BYTES {
            self.workspaces.clear();
            self.ids = 0;
            self.bytes = 0;
        }
        let w = self.workspaces.entry(ws.to_owned()).or_default();
        let pid = profile.profile_id;
        let mut freed = Freed::default();
        w.drop_profile(ws, pid, &mut freed);
        for id in profile.identifiers.keys() {
            if let Some(other) = w.by_id.get(id).copied() {
                // The member was carried in another profile: this read is
                // newer.
                w.drop_profile(ws, other, &mut freed);
            }
        }
        for id in profile.identifiers.keys() {
            self.ids += 1;
            self.bytes += entry_bytes(ws, id);
            w.by_id.insert(id.clone(), pid);
        }
        let slim = ProfileRef {
            decisions: Vec::new(),
            ..profile.clone()
        };
        w.profiles.insert(
            pid,
            Carried {
                profile: Arc::new(slim),
                settled,
            },
        );
        self.forget(freed);
    }

    /// Shows it an event the projector has folded: drops every carried
    /// profile the event may have changed.
    pub(crate) fn observe(&mut self, ev: &Event) {
        // The evaluator's own events name no identifier.
        if ev.source_id == EVALUATOR_SOURCE {
            return;
        }
        let ws = ev.workspace_id.as_str();
        let Some(w) = self.workspaces.get_mut(ws) else {
            return;
        };
        if ev.control.is_some() {
            self.forget_workspace(ws);
            return;
        }
        let mut freed = Freed::default();
        match project(ev) {
            Ok(projection) => {
                let mut pids: Vec<Uuid> = projection
                    .identifiers()
                    .filter(|id| id.kind != IdKind::GroupId)
                    .filter_map(|id| w.by_id.get(id).copied())
                    .collect();
                pids.sort_unstable();
                pids.dedup();
                for pid in pids {
                    let kept = w
                        .profiles
                        .get_mut(&pid)
                        .is_some_and(|c| c.settled.carry(&c.profile.identifiers, &projection));
                    if !kept {
                        w.drop_profile(ws, pid, &mut freed);
                    }
                }
            }
            Err(_) => {
                // The projector dead-letters it, so it changed nothing;
                // its plain identifiers are dropped all the same.
                for id in super::step::touched_ids(ev) {
                    if let Some(pid) = w.by_id.get(&id).copied() {
                        w.drop_profile(ws, pid, &mut freed);
                    }
                }
            }
        }
        self.forget(freed);
    }

    /// Notes a workspace's identity rules as just read; a change drops
    /// its profiles (so does the first read, which may follow a change).
    pub(crate) fn rules_read(&mut self, ws: &str, rules: String) {
        if self.rules.get(ws) != Some(&rules) {
            self.forget_workspace(ws);
            self.rules.insert(ws.to_owned(), rules);
        }
    }

    /// Reads that found a carried profile, and those that did not, since
    /// the last call.
    pub(crate) fn take_counts(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.hits),
            std::mem::take(&mut self.misses),
        )
    }

    fn forget_workspace(&mut self, ws: &str) {
        if let Some(w) = self.workspaces.remove(ws) {
            self.forget(Freed {
                ids: w.by_id.len(),
                bytes: w.by_id.keys().map(|id| entry_bytes(ws, id)).sum(),
            });
        }
    }

    /// Takes dropped entries off the totals.
    fn forget(&mut self, freed: Freed) {
        self.ids = self.ids.saturating_sub(freed.ids);
        self.bytes = self.bytes.saturating_sub(freed.bytes);
    }
}

/// What one identifier's entry costs, roughly: its key twice (the index
/// and the profile's members), its first key and source in the profile's
/// record of it, and the maps' overhead.
fn entry_bytes(ws: &str, id: &Identifier) -> usize {
    2 * (ws.len() + id.value.len()) + 160
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trailmark_domain::identity::Key;
    use trailmark_domain::profile::Named;
    use trailmark_testkit::EventBuilder;

    use super::*;

    fn profile(ids: &[&str], latest: i64) -> ProfileRef {
        let named = |i: i64| Named {
            created: 0,
            last_seen: 0,
            first: Key {
                received_at: i,
                message_id: format!("m{i}"),
            },
            source_id: "src".into(),
        };
        let identifiers: BTreeMap<Identifier, Named> = ids
            .iter()
            .enumerate()
            .map(|(i, s)| (Identifier::parse(s).unwrap(), named(i as i64)))
            .collect();
        let holder = identifiers.keys().next().unwrap().clone();
        ProfileRef {
            profile_id: trailmark_domain::identity::profile_id("ws", &holder),
            holder,
            identifiers,
            decisions: Vec::new(),
            settled: Some(Settled {
                latest: Some(Key {
                    received_at: latest,
                    message_id: "m".into(),
                }),
                room: 10,
            }),
        }
    }

    fn track(user: &str, anon: &str, seconds: i64) -> Event {
        EventBuilder::track("Clicked")
            .workspace("ws")
            .user(user)
            .anon(anon)
            .received(seconds)
            .build()
    }

    #[test]
    fn a_repeat_keeps_a_profile_and_a_new_link_drops_it() {
        let mut r = Resolutions::default();
        let p = profile(&["anonymous_id:a1", "user_id:u1"], 5);
        r.insert("ws", &p);
        let u1 = Identifier::parse("user_id:u1").unwrap();
        let a1 = Identifier::parse("anonymous_id:a1").unwrap();
        r.observe(&track("u1", "a1", 10));
        assert_eq!(r.get("ws", &u1).unwrap().profile_id, p.profile_id);
        assert!(r.get("other", &u1).is_none(), "workspaces apart");
        r.observe(&track("u1", "a2", 11));
        assert!(r.get("ws", &u1).is_none(), "a new identifier joins");
        assert!(r.get("ws", &a1).is_none(), "every member is dropped");
        assert!(r.workspaces["ws"].by_id.is_empty() && r.workspaces["ws"].profiles.is_empty());
        assert_eq!(
            (r.ids, r.bytes),
            (0, 0),
            "what is dropped is no longer counted"
        );
    }

    #[test]
    fn rules_read_again_drop_a_workspace_only_when_changed() {
        let mut r = Resolutions::default();
        let p = profile(&["user_id:u1"], 5);
        r.rules_read("ws", "{}".into());
        r.insert("ws", &p);
        r.rules_read("ws", "{}".into());
        assert!(r.get("ws", &p.holder).is_some());
        r.rules_read("ws", "{\"limits\":{}}".into());
        assert!(r.get("ws", &p.holder).is_none());
    }
}
