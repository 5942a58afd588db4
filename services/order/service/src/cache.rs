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
    by_id: HashMap<Uuid, Cached>,
    /// Insertion order, for eviction (ids may repeat; stale ones are skipped).
    order: VecDeque<Uuid>,
}

/// A bounded map of order id -> latest known state. Cloning shares it.
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
        self.lock().by_id.get(&order_id).cloned()
    }

    /// Remembers `cached` unless a later version is known already.
    pub(crate) fn put(&self, order_id: Uuid, cached: Cached) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        if let Some(known) = entries.by_id.get(&order_id)
            && known.order.version >= cached.order.version
        {
            return;
        }
        if entries.by_id.insert(order_id, cached).is_none() {
            entries.order.push_back(order_id);
        }
        while entries.by_id.len() > self.capacity {
            match entries.order.pop_front() {
                Some(oldest) => {
                    entries.by_id.remove(&oldest);
                }
                None => break,
            }
        }
    }

    /// Forgets an order whose cached state did not hold.
    pub(crate) fn forget(&self, order_id: Uuid) {
        if self.capacity == 0 {
            return;
        }
        // Its id stays in the eviction queue; popping it later is harmless.
        self.lock().by_id.remove(&order_id);
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
    fn the_oldest_order_makes_room_and_an_older_version_never_replaces_a_newer() {
        let cache = AggregateCache::new(2);
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        cache.put(a, at(1));
        cache.put(b, at(1));
        cache.put(a, at(3));
        cache.put(a, at(2));
        assert_eq!(cache.get(a).map(|c| c.order.version), Some(3));
        cache.put(c, at(1));
        assert!(cache.get(a).is_none(), "a was inserted first");
        assert!(cache.get(b).is_some() && cache.get(c).is_some());
        cache.forget(b);
        assert!(cache.get(b).is_none());
    }

    #[test]
    fn a_cache_of_no_size_holds_nothing() {
        let cache = AggregateCache::new(0);
        let id = Uuid::now_v7();
        cache.put(id, at(1));
        assert!(cache.get(id).is_none());
    }
}
