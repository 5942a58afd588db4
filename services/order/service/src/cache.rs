//! Orders this replica wrote or loaded recently, so a command on one of them
//! skips the load (one round trip of three for a create -> pay -> ship).
//!
//! Never trusted for an answer: a command decided on a cached state is
//! appended with the cached version as the expected one, so the append
//! succeeds only if no one else wrote the order since (optimistic
//! concurrency, ADR 3); anything but success falls back to the
//! authoritative path (load, idempotency key, decide). A stale entry costs
//! one wasted decision and, at worst, one refused append.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use order_domain::Order;
use uuid::Uuid;

/// A cached aggregate: its state and when it was created.
#[derive(Debug, Clone)]
pub(crate) struct Cached {
    pub(crate) order: Order,
    pub(crate) first_at: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct Entries {
    /// Each entry with the stamp it was inserted under.
    by_id: HashMap<Uuid, (Cached, u64)>,
    /// Insertion order, for eviction. An id whose stamp no longer matches
    /// its entry (forgotten, or inserted again since) is skipped.
    queue: VecDeque<(Uuid, u64)>,
    next_stamp: u64,
}

impl Entries {
    fn evict(&mut self, capacity: usize) {
        while self.by_id.len() > capacity {
            let Some((oldest, stamp)) = self.queue.pop_front() else {
                break;
            };
            if self.by_id.get(&oldest).is_some_and(|(_, s)| *s == stamp) {
                self.by_id.remove(&oldest);
            }
        }
        // Skipped ids accumulate while nothing needs evicting: keep the
        // queue within twice the entries.
        if self.queue.len() > 2 * self.by_id.len().max(16) {
            let by_id = &self.by_id;
            self.queue
                .retain(|(id, stamp)| by_id.get(id).is_some_and(|(_, s)| s == stamp));
        }
    }
}

/// A bounded map of order id -> latest known state, the order written
/// longest ago evicted first. Cloning shares it.
#[derive(Debug, Clone)]
pub(crate) struct AggregateCache {
    capacity: usize,
    entries: Arc<Mutex<Entries>>,
}

impl AggregateCache {
    /// Holds at most `capacity` orders (0: nothing is cached).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn get(&self, order_id: Uuid) -> Option<Cached> {
        if self.capacity == 0 {
            return None;
        }
        self.lock()
            .by_id
            .get(&order_id)
            .map(|(cached, _)| cached.clone())
    }

    /// Remembers `cached` unless a later version is known already.
    pub(crate) fn put(&self, order_id: Uuid, cached: Cached) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        if let Some((known, _)) = entries.by_id.get(&order_id)
            && known.order.version >= cached.order.version
        {
            return;
        }
        let stamp = entries.next_stamp;
        entries.next_stamp += 1;
        entries.by_id.insert(order_id, (cached, stamp));
        entries.queue.push_back((order_id, stamp));
        entries.evict(self.capacity);
    }

    /// Forgets an order whose cached state did not hold.
    pub(crate) fn forget(&self, order_id: Uuid) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        entries.by_id.remove(&order_id);
        entries.evict(self.capacity);
    }

    /// Entries and queued ids (for tests of the bound).
    #[cfg(test)]
    fn sizes(&self) -> (usize, usize) {
        let entries = self.lock();
        (entries.by_id.len(), entries.queue.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(version: i64) -> Cached {
        Cached {
            order: Order {
                version,
                ..Order::default()
            },
            first_at: Utc::now(),
        }
    }

    #[test]
    fn the_order_written_longest_ago_makes_room_and_an_older_version_never_replaces_a_newer() {
        let cache = AggregateCache::new(2);
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        cache.put(a, at(1));
        cache.put(b, at(1));
        cache.put(a, at(3));
        cache.put(a, at(2));
        assert_eq!(cache.get(a).map(|c| c.order.version), Some(3));
        cache.put(c, at(1));
        assert!(cache.get(b).is_none(), "b was written longest ago");
        assert!(cache.get(a).is_some() && cache.get(c).is_some());
        cache.forget(c);
        assert!(cache.get(c).is_none());
    }

    #[test]
    fn forgetting_and_putting_again_neither_evicts_the_live_entry_nor_grows_the_queue() {
        let cache = AggregateCache::new(2);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        cache.put(a, at(1));
        for version in 2..1000 {
            cache.forget(a);
            cache.put(a, at(version));
        }
        cache.put(b, at(1));
        assert_eq!(
            cache.get(a).map(|c| c.order.version),
            Some(999),
            "a is live"
        );
        assert!(cache.get(b).is_some());
        let (entries, queued) = cache.sizes();
        assert_eq!(entries, 2);
        assert!(queued <= 32, "the queue stays bounded: {queued}");
    }

    #[test]
    fn a_cache_of_no_size_holds_nothing() {
        let cache = AggregateCache::new(0);
        let id = Uuid::now_v7();
        cache.put(id, at(1));
        assert!(cache.get(id).is_none());
    }
}
