//! The event ids `submit` must know about before it admits an event, readable without the
//! core's lock.
//!
//! `submit` answers two questions on the host's thread: is this id waiting already (then the
//! event is a duplicate and gets `Pending` back at once), and did it expire recently (then it is
//! refused)? The core holds the answers in its own maps, but its lock is held for as long as a
//! pass, a checkpoint snapshot or a table growing by a million entries takes, and a host calling
//! `submit` waited for all of it. The core keeps this index in step with its maps instead, inside
//! its own critical sections, and `submit` reads only the index: one of 16 shards, each behind a
//! short lock, so that even a shard's table growing holds up only the submits whose ids hash to
//! that shard, for a sixteenth of the time.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

const SHARDS: usize = 16;

/// What the engine knows about an event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdState {
    /// The event waits in purgatory.
    Waiting,
    /// The event expired; its id is refused until this instant.
    Expired(Instant),
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

    /// `id` waits.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
