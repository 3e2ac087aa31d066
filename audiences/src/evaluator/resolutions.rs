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

/// The cache. One evaluator loop owns it.
#[derive(Default)]
pub(crate) struct Resolutions {
    profiles: HashMap<(String, Uuid), Carried>,
    by_id: HashMap<(String, Identifier), Uuid>,
    bytes: usize,
    /// The identity rules each workspace had when last read (as JSON).
    rules: HashMap<String, String>,
    hits: u64,
    misses: u64,
}

impl Resolutions {
    /// `id`'s profile, if carried.
    pub(crate) fn get(&mut self, ws: &str, id: &Identifier) -> Option<Arc<ProfileRef>> {
        let key = (ws.to_owned(), id.clone());
        let found = self
            .by_id
            .get(&key)
            .and_then(|pid| self.profiles.get(&(key.0, *pid)))
            .map(|c| c.profile.clone());
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
        let pid = profile.profile_id;
        self.drop_profile(ws, pid);
        if self.by_id.len() + profile.identifiers.len() > MAX_IDS || self.bytes > MAX_BYTES {
            self.profiles.clear();
            self.by_id.clear();
            self.bytes = 0;
        }
        for id in profile.identifiers.keys() {
            if let Some(other) = self.by_id.get(&(ws.to_owned(), id.clone())).copied() {
                // The member was carried in another profile: this read is
                // newer.
                self.drop_profile(ws, other);
            }
        }
        for id in profile.identifiers.keys() {
            self.bytes += entry_bytes(ws, id);
            self.by_id.insert((ws.to_owned(), id.clone()), pid);
        }
        let slim = ProfileRef {
            decisions: Vec::new(),
            ..profile.clone()
        };
        self.profiles.insert(
            (ws.to_owned(), pid),
            Carried {
                profile: Arc::new(slim),
                settled,
            },
        );
    }

    /// Shows it an event the projector has folded: drops every carried
    /// profile the event may have changed.
    pub(crate) fn observe(&mut self, ev: &Event) {
        if self.by_id.is_empty() || ev.source_id == EVALUATOR_SOURCE {
            // The evaluator's own events name no identifier.
            return;
        }
        let ws = ev.workspace_id.as_str();
        if ev.control.is_some() {
            self.forget_workspace(ws);
            return;
        }
        let projection = match project(ev) {
            Ok(p) => p,
            Err(_) => {
                // The projector dead-letters it, so it changed nothing;
                // its plain identifiers are dropped all the same.
                for id in super::step::touched_ids(ev) {
                    if let Some(pid) = self.by_id.get(&(ws.to_owned(), id)).copied() {
                        self.drop_profile(ws, pid);
                    }
                }
                return;
            }
        };
        let mut pids: Vec<Uuid> = projection
            .identifiers()
            .filter(|id| id.kind != IdKind::GroupId)
            .filter_map(|id| self.by_id.get(&(ws.to_owned(), id.clone())).copied())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            let key = (ws.to_owned(), pid);
            let kept = match self.profiles.get_mut(&key) {
                Some(c) => c.settled.carry(&c.profile.identifiers, &projection),
                None => false,
            };
            if !kept {
                self.drop_profile(ws, pid);
            }
        }
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
        let pids: Vec<Uuid> = self
            .profiles
            .keys()
            .filter(|(w, _)| w == ws)
            .map(|(_, pid)| *pid)
            .collect();
        for pid in pids {
            self.drop_profile(ws, pid);
        }
    }

    fn drop_profile(&mut self, ws: &str, pid: Uuid) {
        if let Some(c) = self.profiles.remove(&(ws.to_owned(), pid)) {
            for id in c.profile.identifiers.keys() {
                let key = (ws.to_owned(), id.clone());
                if self.by_id.get(&key) == Some(&pid) {
                    self.by_id.remove(&key);
                    self.bytes = self.bytes.saturating_sub(entry_bytes(ws, id));
                }
            }
        }
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

    fn track(user: &str, anon: Option<&str>, received_at: i64) -> Event {
        Event {
            workspace_id: "ws".into(),
            source_id: "src".into(),
            message_id: format!("t{received_at}"),
            kind: trailmark_domain::EventType::Track,
            user_id: Some(user.into()),
            anonymous_id: anon.map(str::to_owned),
            event: Some("Clicked".into()),
            name: None,
            category: None,
            group_id: None,
            previous_id: None,
            timestamp: received_at,
            original_timestamp: None,
            sent_at: None,
            received_at,
            properties: None,
            traits: None,
            context: None,
            integrations: None,
            request_ip: None,
            blocked_ids: Vec::new(),
            control: None,
        }
    }

    #[test]
    fn a_repeat_keeps_a_profile_and_a_new_link_drops_it() {
        let mut r = Resolutions::default();
        let p = profile(&["anonymous_id:a1", "user_id:u1"], 5);
        r.insert("ws", &p);
        let u1 = Identifier::parse("user_id:u1").unwrap();
        let a1 = Identifier::parse("anonymous_id:a1").unwrap();
        r.observe(&track("u1", Some("a1"), 10));
        assert_eq!(r.get("ws", &u1).unwrap().profile_id, p.profile_id);
        assert!(r.get("other", &u1).is_none(), "workspaces apart");
        r.observe(&track("u1", Some("a2"), 11));
        assert!(r.get("ws", &u1).is_none(), "a new identifier joins");
        assert!(r.get("ws", &a1).is_none(), "every member is dropped");
        assert!(r.by_id.is_empty() && r.profiles.is_empty());
        assert_eq!(r.bytes, 0, "what is dropped is no longer counted");
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
