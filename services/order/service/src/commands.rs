//! The command side: load (snapshot + later events + idempotency key, one
//! round trip), decide with the aggregate, append (events + key + snapshot,
//! one statement). Optimistic concurrency comes from the unique
//! `(stream_id, version)`; a lost race is [`CommandError::Conflict`].

use chrono::{DateTime, Utc};
use es::{Aggregate as _, EventContext, RecordedEvent};
use es_postgres::{
    AppendError, Appended, EventStore, IdempotencyKey, NewEvent, SnapshotWrite, StorageError,
};
use order_domain::{DecodeError, Order, OrderCommand, OrderError, OrderEvent};
use uuid::Uuid;

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
        }
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
    async fn original_for_key(&self, key: &IdempotencyKey) -> Result<Outcome, CommandError> {
        let used = self
            .store
            .find_idempotency_key(&key.key)
            .await?
            .filter(|used| used.same_request(key))
            .ok_or(CommandError::KeyReused)?;
        let order_id = order_id_of(&used.stream_id).ok_or(CommandError::KeyReused)?;
        self.original(order_id, used.appended).await
    }

    /// Places a new order. A repeated `key` returns the original order.
    ///
    /// # Errors
    ///
    /// See [`CommandError`].
    pub async fn create(
        &self,
        command: OrderCommand,
        context: &EventContext,
        key: Option<&IdempotencyKey>,
    ) -> Result<Outcome, CommandError> {
        let events = Order::default().handle(command)?;
        let order = Order::replay(&events);
        let order_id = order.id.ok_or(OrderError::NotFound)?;
        self.append(
            order_id,
            Order::default(),
            order,
            (None, None),
            &events,
            context,
            key,
        )
        .await
    }

    /// Runs `command` on an existing order owned by `owner`.
    ///
    /// # Errors
    ///
    /// See [`CommandError`]; another user's order is `NotFound`.
    pub async fn execute(
        &self,
        order_id: Uuid,
        owner: Uuid,
        command: OrderCommand,
        expected_version: Option<i64>,
        context: &EventContext,
        key: Option<&IdempotencyKey>,
    ) -> Result<Outcome, CommandError> {
        let stream = es::stream_id::<Order>(order_id);
        let load = self
            .store
            .load_for_command(
                &stream,
                key.map(|k| k.key.as_str()),
                order_domain::SNAPSHOT_VERSION,
            )
            .await?;
        if let (Some(used), Some(key)) = (load.key, key) {
            if used.stream_id != stream || !used.same_request(key) {
                return Err(CommandError::KeyReused);
            }
            return self.original(order_id, used.appended).await;
        }
        let (base, first_at, last_at) = match &load.snapshot {
            Some(snapshot) => match serde_json::from_value::<Order>(snapshot.state.clone()) {
                Ok(state) if state.version == snapshot.version => {
                    (state, Some(snapshot.first_at), Some(snapshot.last_at))
                }
                _ => {
                    return self
                        .execute_without_snapshot(
                            order_id,
                            owner,
                            command,
                            expected_version,
                            context,
                            key,
                        )
                        .await;
                }
            },
            None => (Order::default(), None, None),
        };
        let current = fold(base, &load.events)?;
        let first_at = first_at.or_else(|| load.events.first().map(|e| e.occurred_at));
        let last_at = load.events.last().map(|e| e.occurred_at).or(last_at);
        self.decide(
            order_id,
            owner,
            current,
            (first_at, last_at),
            command,
            expected_version,
            context,
            key,
        )
        .await
    }

    /// The slow path when a snapshot cannot be used: full replay.
    async fn execute_without_snapshot(
        &self,
        order_id: Uuid,
        owner: Uuid,
        command: OrderCommand,
        expected_version: Option<i64>,
        context: &EventContext,
        key: Option<&IdempotencyKey>,
    ) -> Result<Outcome, CommandError> {
        let events = self.store.load(&es::stream_id::<Order>(order_id)).await?;
        let times = (
            events.first().map(|e| e.occurred_at),
            events.last().map(|e| e.occurred_at),
        );
        let current = fold(Order::default(), &events)?;
        self.decide(
            order_id,
            owner,
            current,
            times,
            command,
            expected_version,
            context,
            key,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn decide(
        &self,
        order_id: Uuid,
        owner: Uuid,
        current: Order,
        times: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        command: OrderCommand,
        expected_version: Option<i64>,
        context: &EventContext,
        key: Option<&IdempotencyKey>,
    ) -> Result<Outcome, CommandError> {
        // Another user's order does not exist, as far as this caller knows.
        if current.status.is_none() || current.user_id != Some(owner) {
            return Err(CommandError::NotFound(order_id));
        }
        if let Some(expected) = expected_version
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
        self.append(order_id, current, next, times, &events, context, key)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn append(
        &self,
        order_id: Uuid,
        current: Order,
        next: Order,
        (first_at, _): (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
        events: &[OrderEvent],
        context: &EventContext,
        key: Option<&IdempotencyKey>,
    ) -> Result<Outcome, CommandError> {
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
        let stream = es::stream_id::<Order>(order_id);
        match self
            .store
            .append(
                &stream,
                current.version,
                &new_events,
                context,
                key,
                snapshot.as_ref(),
            )
            .await
        {
            Ok(appended) => {
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
            Err(AppendError::Conflict { .. }) => Err(CommandError::Conflict(order_id)),
            // A concurrent retry with the same key won: answer as it did.
            Err(AppendError::DuplicateKey) => match key {
                Some(key) => self.original_for_key(key).await,
                None => Err(CommandError::KeyReused),
            },
            Err(error) => Err(CommandError::Append(error)),
        }
    }
}

/// The order id in an `order-<uuid>` stream id.
#[must_use]
pub fn order_id_of(stream_id: &str) -> Option<Uuid> {
    stream_id
        .strip_prefix("order-")
        .and_then(|id| Uuid::parse_str(id).ok())
}
