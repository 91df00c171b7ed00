//! The event ids `submit` must know about before it admits an event, readable without the
//! core's lock.
//!
//! `submit` asks two questions on the host's thread: did this id expire recently (then a synced
//! event whose data is still missing is refused), and does it wait (then the event is sent
//! outside the limits meant for new events, see [`submit_as`])? The core holds the answers in
//! its own maps, but its lock is held for as long as a pass, a checkpoint snapshot or a table
//! growing by a million entries takes, and a host calling `submit` waited for all of it. The
//! core keeps this index in step with its maps instead, inside its own critical sections, and
//! `submit` reads only the index: one of 16 shards, each behind a short lock, so that even a
//! shard's table growing holds up only the submits whose ids hash to that shard, for a
//! sixteenth of the time.
//!
//! The index says what the core has applied, not what the host has asked: a cancel or a submit
//! may still wait in the command channel. So it never decides on its own that a submit needs no
//! command; only the core, applying commands in the order they were sent, knows whether an id
//! still waits when a submit reaches it.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::event::Origin;
use crate::policy::CloneUrl;

const SHARDS: usize = 16;

/// What the engine knows about an event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdState {
    /// The event waits in purgatory.
    Waiting,
    /// The event expired; until this instant a synced re-submission whose data is still
    /// missing is refused.
    Expired(Instant),
}

/// What `submit` does with an event that has something to wait for (an object missing, or ref
/// updates to write), by what the id index says of its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitAs {
    /// Sent as a new event, within `max_events` and the per-identifier URL cap.
    New,
    /// Sent, though the id looks waiting: a cancel or release of it may be applied before this
    /// submit, and then the core queues it as a new event; otherwise the core takes it as a
    /// re-submission and gives back what the handle counted. A re-broadcast of a waiting event
    /// is never refused for the limits meant for new events: it is counted in `max_events`
    /// without the check, and its URLs are reserved without the per-identifier cap.
    Again,
    /// Refused with `PreviouslyExpired`: refused for this much longer.
    Refused(Duration),
}

/// How `submit` sends an event that has something to wait for, submitted at `now` with
/// `origin`, `missing` some object, when the id index says `known` of its id.
///
/// An expired id is refused, as the reference relay refuses it, only while its memory lasts and
/// only for a synced event whose data is still missing: a user publishing it again means it,
/// and a synced event with every object present waits only for its refs. (An event with every
/// object present and no refs never gets here: it is `AlreadySatisfied` whatever its id's
/// state.)
pub fn submit_as(known: Option<IdState>, origin: Origin, missing: bool, now: Instant) -> SubmitAs {
    match known {
        Some(IdState::Waiting) => SubmitAs::Again,
        Some(IdState::Expired(until)) if until > now && origin == Origin::Sync && missing => {
            SubmitAs::Refused(until - now)
        }
        Some(IdState::Expired(_)) | None => SubmitAs::New,
    }
}

/// Waiting and recently expired event ids, sharded by a hash of the id.
pub struct EventIds {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<Arc<str>, IdState>>>,
}

impl Default for EventIds {
    fn default() -> Self {
        EventIds {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl EventIds {
    fn shard(&self, id: &str) -> &Mutex<HashMap<Arc<str>, IdState>> {
        // The low bits pick the shard; the shard's table hashes again with its own keys.
        let h = self.hasher.hash_one(id);
        &self.shards[(h as usize) % SHARDS]
    }

    /// What is known about `id`, if anything.
    pub fn get(&self, id: &str) -> Option<IdState> {
        self.shard(id).lock().get(id).copied()
    }

    /// `id` waits; a refusal recorded for it is over.
    pub fn set_waiting(&self, id: Arc<str>) {
        self.shard(&id).lock().insert(id, IdState::Waiting);
    }

    /// `id` expired and is refused until `until`.
    pub fn set_expired(&self, id: Arc<str>, until: Instant) {
        self.shard(&id).lock().insert(id, IdState::Expired(until));
    }

    /// `id` no longer waits (released, cancelled or expired); an expiry recorded for it stays.
    pub fn forget_waiting(&self, id: &str) {
        let mut shard = self.shard(id).lock();
        if shard.get(id) == Some(&IdState::Waiting) {
            shard.remove(id);
        }
    }

    /// The refusal of `id` that lasted until `until` is over; a newer state of `id` stays.
    pub fn forget_expired(&self, id: &str, until: Instant) {
        let mut shard = self.shard(id).lock();
        if shard.get(id) == Some(&IdState::Expired(until)) {
            shard.remove(id);
        }
    }

    /// Every id and its state, for the tests' comparison with the core's maps.
    #[cfg(test)]
    pub fn all(&self) -> HashMap<Arc<str>, IdState> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The distinct clone URLs (by fetch URL) of each identifier's waiting events, with how many
/// events list each, sharded by a hash of the identifier.
///
/// `submit` reserves an event's URLs here before it hands the event over, and is refused when
/// that would give the identifier more than `max` distinct URLs; the core gives an event's URLs
/// back when it leaves (or when it takes the submit as a re-submission of a waiting event). Check and reservation are
/// one step under the shard's lock, so concurrent submits cannot pass the cap together.
pub struct IdentifierUrls {
    max: usize,
    hasher: RandomState,
    shards: Vec<Mutex<UrlShard>>,
}

/// Identifier → fetch URL → how many waiting events list it.
type UrlShard = HashMap<Arc<str>, HashMap<Arc<str>, u32>>;

/// A reservation would pass the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlsFull {
    /// Distinct URLs the identifier has now.
    pub distinct: usize,
    /// New distinct URLs the event would add.
    pub new: usize,
    /// The cap.
    pub max: usize,
}

impl IdentifierUrls {
    /// An empty index capping identifiers at `max` distinct URLs.
    pub fn new(max: usize) -> Self {
        IdentifierUrls {
            max,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, identifier: &str) -> &Mutex<UrlShard> {
        let h = self.hasher.hash_one(identifier);
        &self.shards[(h as usize) % SHARDS]
    }

    /// Counts `urls` for `identifier`, unless that would give it more than the cap of distinct
    /// URLs. `urls` holds each fetch URL once.
    pub fn reserve(&self, identifier: &Arc<str>, urls: &[CloneUrl]) -> Result<(), UrlsFull> {
        if urls.is_empty() {
            return Ok(());
        }
        let mut shard = self.shard(identifier).lock();
        let counts = shard.entry(identifier.clone()).or_default();
        let new = urls
            .iter()
            .filter(|u| !counts.contains_key(&u.fetch_url))
            .count();
        if counts.len() + new > self.max {
            let distinct = counts.len();
            if counts.is_empty() {
                shard.remove(identifier);
            }
            return Err(UrlsFull {
                distinct,
                new,
                max: self.max,
            });
        }
        for u in urls {
            *counts.entry(u.fetch_url.clone()).or_default() += 1;
        }
        Ok(())
    }

    /// Counts `urls` for `identifier` whatever the cap, for events that were waiting already:
    /// those restored from the state file, and re-submissions of waiting ones.
    pub fn reserve_uncapped(&self, identifier: &Arc<str>, urls: &[CloneUrl]) {
        let mut shard = self.shard(identifier).lock();
        let counts = shard.entry(identifier.clone()).or_default();
        for u in urls {
            *counts.entry(u.fetch_url.clone()).or_default() += 1;
        }
        if counts.is_empty() {
            shard.remove(identifier);
        }
    }

    /// Gives back what a reservation of `urls` for `identifier` counted.
    pub fn release(&self, identifier: &str, urls: &[CloneUrl]) {
        if urls.is_empty() {
            return;
        }
        let mut shard = self.shard(identifier).lock();
        let Some(counts) = shard.get_mut(identifier) else {
            return;
        };
        for u in urls {
            if let Some(n) = counts.get_mut(&u.fetch_url) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&u.fetch_url);
                }
            }
        }
        if counts.is_empty() {
            shard.remove(identifier);
        }
    }

    /// Each identifier's URL counts, for the tests' comparison with the core's entries.
    #[cfg(test)]
    pub fn all(&self) -> UrlShard {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_set_and_forgotten_only_when_they_still_hold() {
        let ids = EventIds::default();
        let t = Instant::now();
        let later = t + Duration::from_secs(1);
        assert_eq!(ids.get("a"), None);
        ids.set_waiting("a".into());
        assert_eq!(ids.get("a"), Some(IdState::Waiting));
        // An event that expires is recorded as expired before it leaves: leaving keeps that.
        ids.set_expired("a".into(), t);
        ids.forget_waiting("a");
        assert_eq!(ids.get("a"), Some(IdState::Expired(t)));
        // An older refusal's end does not forget a newer one.
        ids.set_expired("a".into(), later);
        ids.forget_expired("a", t);
        assert_eq!(ids.get("a"), Some(IdState::Expired(later)));
        ids.forget_expired("a", later);
        assert_eq!(ids.get("a"), None);
        // A waiting id is not forgotten by the end of an old refusal.
        ids.set_waiting("a".into());
        ids.forget_expired("a", later);
        assert_eq!(ids.get("a"), Some(IdState::Waiting));
        ids.forget_waiting("a");
        assert_eq!(ids.get("a"), None);
    }

    /// Only a synced event whose data is still missing is refused, and only while the memory
    /// of its id's expiry lasts; an id that looks waiting is sent, outside the limits.
    #[test]
    fn only_a_synced_event_still_missing_data_is_refused_while_its_expiry_is_remembered() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        let expired = Some(IdState::Expired(later));
        let (user, sync) = (Origin::User, Origin::Sync);
        let cases = [
            (
                expired,
                sync,
                true,
                SubmitAs::Refused(Duration::from_secs(5)),
            ),
            (expired, sync, false, SubmitAs::New),
            (expired, user, true, SubmitAs::New),
            (expired, user, false, SubmitAs::New),
            (Some(IdState::Expired(now)), sync, true, SubmitAs::New),
            (Some(IdState::Waiting), sync, true, SubmitAs::Again),
            (Some(IdState::Waiting), user, false, SubmitAs::Again),
            (None, sync, true, SubmitAs::New),
        ];
        for (known, origin, missing, expect) in cases {
            assert_eq!(
                submit_as(known, origin, missing, now),
                expect,
                "{known:?} {origin:?} missing: {missing}"
            );
        }
    }

    fn url(u: &str) -> CloneUrl {
        crate::policy::clone_url(u)
    }

    #[test]
    fn urls_are_reserved_up_to_the_cap_and_given_back() {
        let index = IdentifierUrls::new(3);
        let a: Arc<str> = "alice/r".into();
        let (u1, u2, u3, u4) = (
            url("git://a.example/r"),
            url("git://b.example/r"),
            url("git://c.example/r"),
            url("git://d.example/r"),
        );
        index.reserve(&a, &[u1.clone(), u2.clone()]).unwrap();
        // A URL already counted adds nothing new.
        index.reserve(&a, &[u2.clone(), u3.clone()]).unwrap();
        let full = index.reserve(&a, &[u1.clone(), u4.clone()]).unwrap_err();
        assert_eq!((full.distinct, full.new, full.max), (3, 1, 3));
        // A refused reservation counted nothing.
        assert_eq!(index.all()[&a].values().sum::<u32>(), 4);
        // Another identifier has its own cap.
        index
            .reserve(&"bob/r".into(), std::slice::from_ref(&u4))
            .unwrap();
        index.release(&a, &[u2.clone(), u3.clone()]);
        index.reserve(&a, std::slice::from_ref(&u4)).unwrap();
        index.release(&a, &[u1, u2, u4.clone()]);
        assert_eq!(index.all().len(), 1, "alice's URLs are all given back");
        index.release("bob/r", &[u4]);
        assert!(index.all().is_empty());
    }

    #[test]
    fn ids_spread_over_the_shards() {
        let ids = EventIds::default();
        for k in 0..1600 {
            ids.set_waiting(format!("event-{k}").into());
        }
        let sizes: Vec<usize> = ids.shards.iter().map(|s| s.lock().len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 1600);
        assert!(sizes.iter().all(|n| (50..=150).contains(n)), "{sizes:?}");
        assert_eq!(ids.all().len(), 1600);
    }
}
