//! The command side: load (snapshot + later events + idempotency key, one
//! round trip; skipped for an order in the replica's cache), decide with the
//! aggregate, append (events + key + snapshot, one statement). Optimistic concurrency comes from the unique
//! `(stream_id, version)`; a lost race is [`CommandError::Conflict`].

use chrono::{DateTime, Utc};
use es::{Aggregate as _, EventContext, RecordedEvent};
use es_postgres::{
    AppendError, Appended, EventStore, IdempotencyKey, NewEvent, SnapshotWrite, StorageError,
};
use order_domain::{DecodeError, Order, OrderCommand, OrderError, OrderEvent};
use uuid::Uuid;

use crate::cache::{AggregateCache, Cached};

/// When an order was created and last changed.
pub type Times = (DateTime<Utc>, DateTime<Utc>);

/// The state after a command, and where its last event landed.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub order: Order,
    pub times: Times,
    /// Global position of the last event written (read-your-writes token).
    pub position: i64,
}

/// Everything about one command but the command itself: which order,
/// whose, the version the caller expects, what caused it and its
/// idempotency key. The transport builds it once; the command path passes
/// it along whole.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub order_id: Uuid,
    /// The caller: only the order's owner may act on it.
    pub owner: Uuid,
    /// `None`: any version.
    pub expected_version: Option<i64>,
    pub context: &'a EventContext,
    pub key: Option<&'a IdempotencyKey>,
}

impl Envelope<'_> {
    fn stream(&self) -> String {
        es::stream_id::<Order>(self.order_id)
    }
}

/// A decided command: the state before and after, and the events between.
struct Decision {
    current: Order,
    next: Order,
    events: Vec<OrderEvent>,
    /// When the order was created (`None`: by this command).
    first_at: Option<DateTime<Utc>>,
}

/// Why a command did not append.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Rejected(#[from] OrderError),
    #[error("order {0} not found")]
    NotFound(Uuid),
    #[error("order is at version {actual}, not the expected {expected}")]
    WrongVersion { expected: i64, actual: i64 },
    #[error("order {0} was changed concurrently; reload and retry")]
    Conflict(Uuid),
    #[error("idempotency key was already used for a different request")]
    KeyReused,
    #[error("stored event cannot be read: {0}")]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Store(#[from] StorageError),
    #[error(transparent)]
    Append(AppendError),
}

/// Executes order commands against the event store.
#[derive(Debug, Clone)]
pub struct OrderCommands {
    store: EventStore,
    /// Store a snapshot each time a stream's version crosses a multiple of this.
    snapshot_every: i64,
    metrics: Option<platform::metrics::Metrics>,
    cache: AggregateCache,
}

fn decode(event: &RecordedEvent) -> Result<OrderEvent, DecodeError> {
    order_domain::decode(&event.event_type, event.schema_version, &event.payload)
}

/// Folds recorded events onto `state`.
fn fold(mut state: Order, events: &[RecordedEvent]) -> Result<Order, DecodeError> {
    for event in events {
        state.apply(&decode(event)?);
    }
    Ok(state)
}

impl OrderCommands {
    #[must_use]
    pub fn new(store: EventStore, snapshot_every: i64) -> Self {
        Self {
            store,
            snapshot_every: snapshot_every.max(1),
            metrics: None,
            cache: AggregateCache::new(0),
        }
    }

    /// Remembers up to `orders` recently written aggregates, so a command on
    /// one of them skips the load (see [`crate::cache`]).
    #[must_use]
    pub fn with_cache(mut self, orders: usize) -> Self {
        self.cache = AggregateCache::new(orders);
        self
    }

    /// Counts appended events in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: platform::metrics::Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    #[must_use]
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// The result a used idempotency key produced: the order as of the
    /// version it wrote.
    async fn original(&self, order_id: Uuid, appended: Appended) -> Result<Outcome, CommandError> {
        let stream = es::stream_id::<Order>(order_id);
        let events = self
            .store
            .load_until(&stream, Some(appended.version), None)
            .await?;
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Err(CommandError::NotFound(order_id));
        };
        let times = (first.occurred_at, last.occurred_at);
        Ok(Outcome {
            order: fold(Order::default(), &events)?,
            times,
            position: appended.position,
        })
    }

    /// The answer to a retry whose key another append already stored: the
    /// original result if the request is the same, else `KeyReused`.
    async fn original_for_key(
        &self,
        key: &IdempotencyKey,
        stream: Option<&str>,
    ) -> Result<Outcome, CommandError> {
        let used = self
            .store
            .find_idempotency_key(&key.key)
            .await?
            .filter(|used| used.same_request(key))
            .ok_or(CommandError::KeyReused)?;
        // As on the load path: a key is bound to the order it was used on.
        if let Some(stream) = stream
            && used.stream_id != stream
        {
            return Err(CommandError::KeyReused);
        }
        let order_id = es::id_of_stream::<Order>(&used.stream_id).ok_or(CommandError::KeyReused)?;
        self.original(order_id, used.appended).await
    }

    /// Places a new order with the envelope's id. A repeated `key` returns
    /// the original order.
    ///
    /// # Errors
    ///
    /// See [`CommandError`].
    pub async fn create(
        &self,
        envelope: &Envelope<'_>,
        command: OrderCommand,
    ) -> Result<Outcome, CommandError> {
        let events = Order::default().handle(command)?;
        let next = Order::replay(&events);
        self.append(
            envelope,
            Decision {
                current: Order::default(),
                next,
                events,
                first_at: None,
            },
        )
        .await
    }

    /// Runs `command` on an existing order owned by `envelope.owner`.
    ///
    /// # Errors
    ///
    /// See [`CommandError`]; another user's order is `NotFound`.
    pub async fn execute(
        &self,
        envelope: &Envelope<'_>,
        command: OrderCommand,
    ) -> Result<Outcome, CommandError> {
        if let Some(Cached { order, first_at }) = self.cache.get(envelope.order_id) {
            match self
                .decide(envelope, order, Some(first_at), command.clone())
                .await
            {
                Ok(outcome) => return Ok(outcome),
                // The outcome of an append that failed this way is unknown:
                // never decide it a second time.
                Err(error @ (CommandError::Store(_) | CommandError::Append(_))) => {
                    self.cache.forget(envelope.order_id);
                    return Err(error);
                }
                // Nothing was written; the cached state may be stale (or
                // the request a retry): ask the store.
                Err(_) => self.cache.forget(envelope.order_id),
            }
        }
        let stream = envelope.stream();
        let load = self
            .store
            .load_for_command(
                &stream,
                envelope.key.map(|k| k.key.as_str()),
                order_domain::SNAPSHOT_VERSION,
            )
            .await?;
        if let (Some(used), Some(key)) = (load.key, envelope.key) {
            if used.stream_id != stream || !used.same_request(key) {
                return Err(CommandError::KeyReused);
            }
            return self.original(envelope.order_id, used.appended).await;
        }
        let (base, first_at) = match &load.snapshot {
            Some(snapshot) => match serde_json::from_value::<Order>(snapshot.state.clone()) {
                Ok(state) if state.version == snapshot.version => (state, Some(snapshot.first_at)),
                _ => return self.execute_without_snapshot(envelope, command).await,
            },
            None => (Order::default(), None),
        };
        let current = fold(base, &load.events)?;
        let first_at = first_at.or_else(|| load.events.first().map(|e| e.occurred_at));
        self.decide(envelope, current, first_at, command).await
    }

    /// The slow path when a snapshot cannot be used: full replay.
    async fn execute_without_snapshot(
        &self,
        envelope: &Envelope<'_>,
        command: OrderCommand,
    ) -> Result<Outcome, CommandError> {
        let events = self.store.load(&envelope.stream()).await?;
        let first_at = events.first().map(|e| e.occurred_at);
        let current = fold(Order::default(), &events)?;
        self.decide(envelope, current, first_at, command).await
    }

    async fn decide(
        &self,
        envelope: &Envelope<'_>,
        current: Order,
        first_at: Option<DateTime<Utc>>,
        command: OrderCommand,
    ) -> Result<Outcome, CommandError> {
        // Another user's order does not exist, as far as this caller knows.
        if current.status.is_none() || current.user_id != Some(envelope.owner) {
            return Err(CommandError::NotFound(envelope.order_id));
        }
        if let Some(expected) = envelope.expected_version
            && expected != current.version
        {
            return Err(CommandError::WrongVersion {
                expected,
                actual: current.version,
            });
        }
        let events = current.handle(command)?;
        let mut next = current.clone();
        for event in &events {
            next.apply(event);
        }
        self.append(
            envelope,
            Decision {
                current,
                next,
                events,
                first_at,
            },
        )
        .await
    }

    async fn append(
        &self,
        envelope: &Envelope<'_>,
        decision: Decision,
    ) -> Result<Outcome, CommandError> {
        let Decision {
            current,
            next,
            events,
            first_at,
        } = decision;
        let current_version = current.version;
        let now = es_postgres::now();
        let first_at = first_at.unwrap_or(now);
        let new_events = events
            .iter()
            .map(|e| NewEvent::from_domain(e, now))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CommandError::Append(AppendError::Encode(e)))?;
        let snapshot = (next.version / self.snapshot_every > current.version / self.snapshot_every)
            .then(|| serde_json::to_value(&next).ok())
            .flatten()
            .map(|state| SnapshotWrite {
                snapshot_version: order_domain::SNAPSHOT_VERSION,
                state,
                first_at,
                last_at: now,
            });
        match self
            .store
            .append(
                &envelope.stream(),
                current.version,
                &new_events,
                envelope.context,
                envelope.key,
                snapshot.as_ref(),
            )
            .await
        {
            Ok(appended) => {
                self.cache.put(
                    envelope.order_id,
                    Cached {
                        order: next.clone(),
                        first_at,
                    },
                );
                if let Some(metrics) = &self.metrics {
                    for event in &new_events {
                        metrics.events_appended(event.event_type, 1);
                    }
                }
                Ok(Outcome {
                    order: next,
                    times: (first_at, now),
                    position: appended.position,
                })
            }
            Err(AppendError::Conflict { .. }) => Err(CommandError::Conflict(envelope.order_id)),
            // A concurrent retry with the same key won: answer as it did.
            Err(AppendError::DuplicateKey) => match envelope.key {
                // A create's retry mints a new id: its key is bound to the
                // order it created, which is not this one.
                Some(key) => {
                    let stream = envelope.stream();
                    let bound = (current_version > 0).then_some(stream.as_str());
                    self.original_for_key(key, bound).await
                }
                None => Err(CommandError::KeyReused),
            },
            Err(error) => Err(CommandError::Append(error)),
        }
    }
}
