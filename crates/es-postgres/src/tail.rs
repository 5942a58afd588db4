//! Following the events table in a gap-safe order. The outbox relay and the
//! projections are both [`Subscriber`]s run by [`run`].
//!
//! # Why not `WHERE position > last`
//!
//! `position` is taken at insert but becomes visible at commit, so a slow
//! transaction can commit position 7 after position 8 was read and the cursor
//! moved past it: the event is skipped forever. [`read_batch`] reads only rows
//! whose writing transaction is older than the oldest transaction still
//! running (`tx_id < pg_snapshot_xmin(pg_current_snapshot())`), in
//! `(tx_id, position)` order. Below that horizon nothing can appear any more,
//! so the cursor `(tx_id, position)` never passes an event that commits later.
//! A long-running writer delays followers; it never makes them skip an event.
//!
//! # Leadership
//!
//! Only one follower per name runs at a time, whichever replica it is in:
//! it holds a session advisory lock on its own connection, which is also
//! the connection it reads and checkpoints on, so losing the connection
//! loses the lock, its own reads and its checkpoints together. (With
//! [`SharedReads`] it may be handed a read another follower made; it still
//! reads on its own after every poll, and a checkpoint on a lost connection
//! fails.) The other replicas stand by and ask for the lock every
//! [`TailConfig::standby_interval`].
//!
//! - A leader that dies (kill -9, a crash) closes its socket: Postgres ends
//!   the session and frees the lock at once; a standby takes over within
//!   one standby interval.
//! - A leader cut off from Postgres without its socket closing (a partition,
//!   a frozen process, a proxy in between that keeps the socket open): a
//!   leader talks to Postgres at least every poll interval, so its session
//!   asks the server to end it after [`TailConfig::silence_timeout`] of
//!   silence (`idle_session_timeout`, `idle_in_transaction_session_timeout`),
//!   and for TCP keepalives besides
//!   ([`session_sql`]); either frees the lock, and a standby takes over
//!   within the silence timeout plus one standby interval. On the leader's
//!   side every step on the connection has a deadline
//!   ([`TailConfig::step_timeout`]), so it gives up, drops the connection
//!   and stands by itself.
//!
//! Two leaders are never both *checkpointing*; during a partition the old
//! one may still publish what it had read or was handed, which JetStream's
//! duplicate window (message id = event id) drops.

use std::{
    collections::VecDeque,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use es::RecordedEvent;
use sqlx::{Connection as _, PgConnection, Row as _, postgres::PgListener};
use tokio_util::sync::CancellationToken;

use crate::store::{EVENT_COLUMNS, recorded_event};

/// Position of a follower in commit-safe order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// `xid8` of the writing transaction (as text: sqlx has no type for it).
    /// Compared numerically via [`Cursor::key`].
    pub tx_id: String,
    pub position: i64,
}

impl Cursor {
    /// Before the first event.
    #[must_use]
    pub fn start() -> Self {
        Self {
            tx_id: "0".to_owned(),
            position: 0,
        }
    }

    /// Numeric ordering key (`xid8` is a 64-bit integer).
    #[must_use]
    pub fn key(&self) -> (u64, i64) {
        (self.tx_id.parse().unwrap_or(0), self.position)
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "position {} (tx {})", self.position, self.tx_id)
    }
}

/// Why a follower's step failed. Retried after a pause.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct TailError(Box<dyn std::error::Error + Send + Sync>);

impl TailError {
    /// Wraps any error.
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(error))
    }
}

impl From<sqlx::Error> for TailError {
    fn from(error: sqlx::Error) -> Self {
        Self::new(error)
    }
}

/// Something that follows the events table.
pub trait Subscriber: Send {
    /// Name for the advisory lock and the logs; unique per database.
    fn name(&self) -> String;

    /// Where to start: the persisted cursor, or [`Cursor::start`].
    fn load_cursor(
        &mut self,
        conn: &mut PgConnection,
    ) -> impl Future<Output = Result<Cursor, TailError>> + Send;

    /// Handles a non-empty batch and persists the cursor of its last event.
    /// On error the batch is read again from the persisted cursor, so a
    /// subscriber may persist a prefix it fully handled (the relay does)
    /// but never a cursor past an event it did not handle.
    fn handle(
        &mut self,
        conn: &mut PgConnection,
        batch: &[(Cursor, RecordedEvent)],
    ) -> impl Future<Output = Result<(), TailError>> + Send;

    /// Checked between batches; `false` stops the follower for good.
    fn keep_running(
        &mut self,
        _conn: &mut PgConnection,
        _cursor: &Cursor,
    ) -> impl Future<Output = Result<bool, TailError>> + Send {
        async { Ok(true) }
    }
}

/// Tuning of one follower.
#[derive(Debug, Clone)]
pub struct TailConfig {
    pub batch_size: i64,
    /// Poll even without a NOTIFY, so a lost notification costs latency only.
    pub poll_interval: Duration,
    /// Pause after a failure (Postgres or NATS unreachable) before retrying.
    pub retry_delay: Duration,
    /// How often a standby asks for the leader's lock: the takeover time
    /// after a leader dies.
    pub standby_interval: Duration,
    /// Deadline of each step on the leader's connection (a read, a batch);
    /// past it the connection is taken as lost.
    pub step_timeout: Duration,
    /// The server ends a follower's session silent this long, freeing its
    /// lock (`idle_in_transaction_session_timeout`, and `idle_session_timeout`
    /// on Postgres 14 and later; zero: never). A leader is silent on its
    /// connection for at most `poll_interval` between batches and for the
    /// time a batch's handling takes (the relay: at most one publish
    /// timeout, `RelayConfig::publish_timeout`), so keep this well above both.
    pub silence_timeout: Duration,
    /// Where leadership is shown (`shop_follower_leader`).
    pub metrics: Option<platform::metrics::Metrics>,
    /// Reads shared with the other followers of the same database in this
    /// process (see [`SharedReads`]); `None`: every read is the follower's own.
    pub shared_reads: Option<SharedReads>,
}

impl Default for TailConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            retry_delay: Duration::from_millis(500),
            standby_interval: Duration::from_secs(1),
            step_timeout: Duration::from_secs(30),
            silence_timeout: Duration::from_secs(6),
            metrics: None,
            shared_reads: None,
        }
    }
}

/// Settings of a follower's session, so that the server ends it (freeing
/// the lock) when the follower is gone without closing its socket: after
/// `silence` without a statement, inside a transaction (a batch being
/// applied when the link went silent) or outside one
/// (`idle_session_timeout`, where the server has it: Postgres 14+), and
/// when TCP keepalives go unanswered (~5 s idle, then 5 probes 1 s apart;
/// unacknowledged data given up after 10 s).
#[must_use]
pub fn session_sql(silence: Duration) -> String {
    format!(
        "SELECT set_config('tcp_keepalives_idle', '5', false), \
         set_config('tcp_keepalives_interval', '1', false), \
         set_config('tcp_keepalives_count', '5', false), \
         set_config('tcp_user_timeout', '10000', false), \
         set_config('idle_in_transaction_session_timeout', '{silence}', false), \
         CASE WHEN current_setting('server_version_num')::int >= 140000 \
              THEN set_config('idle_session_timeout', '{silence}', false) END",
        silence = silence.as_millis()
    )
}

/// `shop_follower_leader` for one follower, back to 0 when dropped.
struct Leading<'a> {
    metrics: Option<&'a platform::metrics::Metrics>,
    name: &'a str,
}

impl<'a> Leading<'a> {
    fn new(metrics: Option<&'a platform::metrics::Metrics>, name: &'a str) -> Self {
        if let Some(metrics) = metrics {
            metrics.set_follower_leader(name, true);
        }
        Self { metrics, name }
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if let Some(metrics) = self.metrics {
            metrics.set_follower_leader(self.name, false);
        }
    }
}

/// `step` under the leader's deadline: a timeout is an error like any
/// other, after which the connection is dropped.
async fn step<T, E: Into<TailError>>(
    timeout: Duration,
    what: &'static str,
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, TailError> {
    match tokio::time::timeout(timeout, step).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(TailError::new(StepTimedOut { what, timeout })),
    }
}

/// A step on the leader's connection took longer than its deadline.
#[derive(Debug, thiserror::Error)]
#[error("{what} took longer than {timeout:?}: the connection is taken as lost")]
struct StepTimedOut {
    what: &'static str,
    timeout: Duration,
}

/// The NOTIFY channel a statement trigger on `events` signals at commit.
pub const CHANNEL: &str = "events_appended";
/// How soon a follower reads again when its last read was below a
/// transaction it was woken for.
const RECHECK: Duration = Duration::from_millis(10);
/// Most queued wake-ups taken at once before a read.
const DRAIN: usize = 1024;
const LOCK_SQL: &str = "SELECT pg_try_advisory_lock(hashtext('shop.tail.' || $1))";

/// Runs `subscriber` until `shutdown` fires or it asks to stop, surviving
/// Postgres outages and its own errors.
pub async fn run<S: Subscriber>(
    database_url: String,
    mut subscriber: S,
    config: TailConfig,
    shutdown: CancellationToken,
) {
    let name = subscriber.name();
    while !shutdown.is_cancelled() {
        match follow(&database_url, &mut subscriber, &config, &shutdown).await {
            Ok(()) => break,
            Err(error) => tracing::warn!(follower = %name, %error, "interrupted; retrying"),
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(config.retry_delay) => {}
        }
    }
    tracing::info!(follower = %name, "stopped");
}

/// Takes the lock, then handles batches until shutdown, retirement or an error.
async fn follow<S: Subscriber>(
    database_url: &str,
    subscriber: &mut S,
    config: &TailConfig,
    shutdown: &CancellationToken,
) -> Result<(), TailError> {
    let name = subscriber.name();
    let limit = config.step_timeout;
    let mut conn = step(limit, "connecting", PgConnection::connect(database_url)).await?;
    step(
        limit,
        "setting up the session",
        sqlx::query(sqlx::AssertSqlSafe(session_sql(config.silence_timeout))).execute(&mut conn),
    )
    .await?;
    if let Some(metrics) = &config.metrics {
        metrics.set_follower_leader(&name, false);
    }
    let standing_by = std::time::Instant::now();
    loop {
        let locked: bool = step(
            limit,
            "asking for the lock",
            sqlx::query_scalar(LOCK_SQL)
                .bind(&name)
                .fetch_one(&mut conn),
        )
        .await?;
        if locked {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(config.standby_interval) => {}
        }
    }
    let _leading = Leading::new(config.metrics.as_ref(), &name);
    let mut listener = step(limit, "listening", PgListener::connect(database_url)).await?;
    step(limit, "listening", listener.listen(CHANNEL)).await?;
    let mut cursor = step(
        limit,
        "loading the cursor",
        subscriber.load_cursor(&mut conn),
    )
    .await?;
    tracing::info!(
        follower = %name,
        %cursor,
        stood_by_ms = standing_by.elapsed().as_millis(),
        "leading: following the events table"
    );
    let shared = config
        .shared_reads
        .as_ref()
        .filter(|reads| reads.database == database_url);
    // The horizon a read handed over from another follower must have
    // reached: past every transaction whose wake-up this follower took
    // (that read saw those commits), and no lower than its own last read.
    // `u64::MAX` (after a poll or a wake-up without a transaction id):
    // only a read of its own will do.
    let mut needed = u64::MAX;
    // Past every transaction this follower was woken for (0: none yet). A
    // read below it left a commit it was told about unread (an older
    // transaction, of any database, held the horizon back, and its own
    // commit may send no wake-up): the follower then reads again after
    // `RECHECK`, not after its poll interval.
    let mut woken_for = 0_u64;
    loop {
        if !step(
            limit,
            "checking in",
            subscriber.keep_running(&mut conn, &cursor),
        )
        .await?
        {
            return Ok(());
        }
        let read = match shared {
            Some(reads) => reads.read(&mut conn, &cursor, config.batch_size, needed),
            None => Box::pin(Batch::read(&mut conn, &cursor, config.batch_size)),
        };
        let batch = step(limit, "reading a batch", read).await?;
        needed = if batch.own {
            batch.horizon
        } else {
            needed.max(batch.horizon)
        };
        let events = batch.events();
        if let Some((last, _)) = events.last() {
            let last = last.clone();
            step(
                limit,
                "handling a batch",
                subscriber.handle(&mut conn, events),
            )
            .await?;
            cursor = last;
            if batch.more {
                continue;
            }
        }
        let behind = batch.horizon < woken_for;
        let wait = if behind {
            RECHECK.min(config.poll_interval)
        } else {
            config.poll_interval
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            notification = listener.recv() => {
                let tx = committed(&notification?);
                needed = needed.max(tx);
                if tx != u64::MAX {
                    woken_for = woken_for.max(tx);
                }
                // Commits that landed while the last batch was handled each
                // sent a notification; one read answers them all. Only what
                // is already received is taken (never a wait), and at most
                // `DRAIN` of it, so a steady stream of commits cannot hold
                // the follower here. `recv` is cancel-safe: a message is
                // consumed only once it is whole.
                for _ in 0..DRAIN {
                    match futures::FutureExt::now_or_never(listener.recv()) {
                        Some(more) => {
                            let tx = committed(&more?);
                            needed = needed.max(tx);
                            if tx != u64::MAX {
                    woken_for = woken_for.max(tx);
                }
                        }
                        None => break,
                    }
                }
            }
            () = tokio::time::sleep(wait) => needed = u64::MAX,
        }
    }
}

/// The horizon a read must have passed to have seen the commit behind
/// `notification` (its payload is the transaction id; `u64::MAX` if it has
/// none, e.g. from a trigger older than the payload).
fn committed(notification: &sqlx::postgres::PgNotification) -> u64 {
    notification
        .payload()
        .parse::<u64>()
        .map_or(u64::MAX, |tx| tx.saturating_add(1))
}

/// Events a follower read (or was handed from a shared read), from `from`.
#[derive(Debug)]
struct Batch {
    read: Arc<Vec<(Cursor, RecordedEvent)>>,
    from: usize,
    to: usize,
    /// The read stopped at its limit: more may follow at once.
    more: bool,
    /// `pg_snapshot_xmin` of the read: every transaction below it had
    /// finished, and the read holds all their events past its cursor.
    horizon: u64,
    /// Read by this follower (not handed over).
    own: bool,
}

impl Batch {
    async fn read(
        conn: &mut PgConnection,
        cursor: &Cursor,
        limit: i64,
    ) -> Result<Self, sqlx::Error> {
        let (events, horizon) = read_with_horizon(conn, cursor, limit).await?;
        let more = events.len() as i64 >= limit;
        Ok(Self {
            to: events.len(),
            read: Arc::new(events),
            from: 0,
            more,
            horizon,
            own: true,
        })
    }

    fn events(&self) -> &[(Cursor, RecordedEvent)] {
        &self.read[self.from..self.to]
    }
}

/// A read one follower made, kept for the others.
#[derive(Debug)]
struct Recent {
    /// Cursor the read started after.
    after: Cursor,
    events: Arc<Vec<(Cursor, RecordedEvent)>>,
    full: bool,
    horizon: u64,
}

/// A read being made now.
#[derive(Debug)]
struct InFlight {
    id: u64,
    after: Cursor,
    started: Instant,
    done: Arc<tokio::sync::Notify>,
}

/// Kept reads (newest last) and the reads being made.
#[derive(Debug, Default)]
struct Kept {
    reads: VecDeque<Recent>,
    in_flight: Vec<InFlight>,
    next_id: u64,
}

/// Reads shared by the followers of one database in one process.
///
/// The relay and the projections advance in step: each woken by the same
/// commit would read the same events on its own connection, decode them
/// and hand them on. With shared reads, the first follower to read after a
/// wake-up queries Postgres and keeps the result; a follower whose cursor is
/// where that read started, or on one of its events, takes the rest of it
/// instead of querying. This is safe because a read is gap-safe as a whole
/// ([`read_batch`]): it holds every event after its start cursor whose
/// transaction is below its horizon, and nothing can appear below that
/// horizon any more, so any suffix of it is exactly what a read from that
/// event's cursor would have returned. A read whose horizon is not past
/// every transaction whose wake-up the follower took (the wake-up names the
/// transaction) is older than a commit it was told about: the follower
/// handles its events and reads again at once, so it never waits for the
/// next wake-up with such a commit unread. After a poll (or a wake-up
/// without a transaction id) a follower reads on its own.
///
/// A follower waits for another's read only if it started from the same
/// cursor less than [`SHARED_WAIT`] ago; any other read (a follower
/// behind the others, a connection in trouble) holds up no one. Each
/// follower still checkpoints on its own connection, where its leadership
/// lock is.
#[derive(Debug, Clone)]
pub struct SharedReads {
    database: String,
    kept: Arc<std::sync::Mutex<Kept>>,
    counts: Arc<ReadCounts>,
}

/// How the reads of followers with [`SharedReads`] were answered.
#[derive(Debug, Default)]
struct ReadCounts {
    queried: std::sync::atomic::AtomicU64,
    handed_over: std::sync::atomic::AtomicU64,
}

/// Reads kept: enough for followers a few batches apart.
const KEPT_READS: usize = 8;
/// Longest a follower waits for another's read of the same events before
/// it reads on its own (a read takes about a millisecond).
const SHARED_WAIT: Duration = Duration::from_millis(100);

type BatchRead<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<Batch, sqlx::Error>> + Send + 'a>>;

/// Removes its read from the reads in flight and wakes those waiting for
/// it, whether the read succeeded, failed or was dropped.
struct Reading<'a> {
    kept: &'a std::sync::Mutex<Kept>,
    id: u64,
    done: Arc<tokio::sync::Notify>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        lock(self.kept).in_flight.retain(|f| f.id != self.id);
        self.done.notify_waiters();
    }
}

/// The kept reads; a panic elsewhere while holding them leaves them usable
/// (every change to them is a single push or removal).
fn lock(kept: &std::sync::Mutex<Kept>) -> std::sync::MutexGuard<'_, Kept> {
    kept.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SharedReads {
    /// Shared reads for the followers of `database_url` (a follower of any
    /// other database reads on its own).
    #[must_use]
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database: database_url.into(),
            kept: Arc::default(),
            counts: Arc::default(),
        }
    }

    /// Reads so far: (queried from Postgres, handed over from a kept read).
    #[must_use]
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counts.queried.load(Relaxed),
            self.counts.handed_over.load(Relaxed),
        )
    }

    fn count(&self, counter: impl Fn(&ReadCounts) -> &std::sync::atomic::AtomicU64) {
        counter(&self.counts).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A kept answer, or the read of the same events another follower is
    /// making now (its id, its wake-up and its deadline).
    fn look(
        &self,
        cursor: &Cursor,
        limit: i64,
        needed: u64,
    ) -> Result<Batch, Option<(u64, Arc<tokio::sync::Notify>, Instant)>> {
        let kept = lock(&self.kept);
        if let Some(batch) = answer(&kept.reads, cursor, limit, needed) {
            return Ok(batch);
        }
        Err(kept
            .in_flight
            .iter()
            .find(|f| f.after == *cursor && f.started.elapsed() < SHARED_WAIT)
            .map(|f| (f.id, Arc::clone(&f.done), f.started + SHARED_WAIT)))
    }

    fn read<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        cursor: &'a Cursor,
        limit: i64,
        needed: u64,
    ) -> BatchRead<'a> {
        Box::pin(async move {
            match self.look(cursor, limit, needed) {
                Ok(batch) => {
                    self.count(|c| &c.handed_over);
                    return Ok(batch);
                }
                Err(Some((id, done, deadline))) => {
                    let notified = done.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    // Still in flight now that the wake-up is armed: it
                    // cannot finish unseen.
                    let waiting = lock(&self.kept).in_flight.iter().any(|f| f.id == id);
                    if waiting {
                        let _ = tokio::time::timeout_at(deadline.into(), notified).await;
                    }
                    if let Ok(batch) = self.look(cursor, limit, needed) {
                        self.count(|c| &c.handed_over);
                        return Ok(batch);
                    }
                }
                Err(None) => {}
            }
            self.count(|c| &c.queried);
            let reading = {
                let mut kept = lock(&self.kept);
                kept.next_id += 1;
                let id = kept.next_id;
                let done = Arc::new(tokio::sync::Notify::new());
                kept.in_flight.push(InFlight {
                    id,
                    after: cursor.clone(),
                    started: Instant::now(),
                    done: Arc::clone(&done),
                });
                Reading {
                    kept: &self.kept,
                    id,
                    done,
                }
            };
            let batch = Batch::read(conn, cursor, limit).await?;
            {
                let mut kept = lock(&self.kept);
                if kept.reads.len() == KEPT_READS {
                    kept.reads.pop_front();
                }
                kept.reads.push_back(Recent {
                    after: cursor.clone(),
                    events: Arc::clone(&batch.read),
                    full: batch.more,
                    horizon: batch.horizon,
                });
            }
            drop(reading);
            Ok(batch)
        })
    }
}

/// The part of a kept read that answers a read from `cursor` for a
/// follower that needs `needed` (see [`SharedReads`]), if any.
fn answer(reads: &VecDeque<Recent>, cursor: &Cursor, limit: i64, needed: u64) -> Option<Batch> {
    if needed == u64::MAX {
        return None;
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX).max(1);
    reads.iter().rev().find_map(|read| {
        let from = if read.after == *cursor {
            0
        } else {
            read.events.iter().position(|(c, _)| c == cursor)? + 1
        };
        // Older than a commit the follower was told about: its events
        // are still right, but more may follow them at once.
        let stale = read.horizon < needed;
        // A read that ends at the cursor says nothing about what came
        // after it, unless it was complete (then: nothing, up to its
        // horizon) and recent enough.
        if from == read.events.len() && (read.full || stale) {
            return None;
        }
        let to = read.events.len().min(from + limit);
        Some(Batch {
            read: Arc::clone(&read.events),
            from,
            to,
            more: to < read.events.len() || read.full || stale,
            horizon: read.horizon,
            own: false,
        })
    })
}

/// The next events past `cursor` whose transactions can no longer be joined
/// by an earlier, still running one (see the module docs).
///
/// # Errors
///
/// Fails when Postgres is unreachable.
pub async fn read_batch(
    conn: &mut PgConnection,
    cursor: &Cursor,
    limit: i64,
) -> Result<Vec<(Cursor, RecordedEvent)>, sqlx::Error> {
    Ok(read_with_horizon(conn, cursor, limit).await?.0)
}

/// [`read_batch`] and the horizon it read below (`pg_snapshot_xmin`).
async fn read_with_horizon(
    conn: &mut PgConnection,
    cursor: &Cursor,
    limit: i64,
) -> Result<(Vec<(Cursor, RecordedEvent)>, u64), sqlx::Error> {
    // One snapshot for the statement: the horizon is the one the rows were
    // read below, and it comes back even when no row does.
    let sql = format!(
        "SELECT h.horizon::text AS horizon_text, e.* \
         FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) h \
         LEFT JOIN LATERAL ( \
             SELECT tx_id AS tx_order, tx_id::text AS tx_text, {EVENT_COLUMNS} FROM events \
             WHERE (tx_id, position) > ($1::text::xid8, $2) AND tx_id < h.horizon \
             ORDER BY tx_id, position LIMIT $3) e ON true \
         ORDER BY e.tx_order, e.position"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&cursor.tx_id)
        .bind(cursor.position)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    let horizon = match rows.first() {
        Some(row) => row
            .try_get::<String, _>("horizon_text")?
            .parse()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        None => 0,
    };
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let Some(tx_id) = row.try_get::<Option<String>, _>("tx_text")? else {
            continue;
        };
        let event = recorded_event(row)?;
        events.push((
            Cursor {
                tx_id,
                position: event.position,
            },
            event,
        ));
    }
    Ok((events, horizon))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor(position: i64) -> Cursor {
        Cursor {
            tx_id: (1000 + position).to_string(),
            position,
        }
    }

    fn event(position: i64) -> (Cursor, RecordedEvent) {
        (
            cursor(position),
            RecordedEvent {
                position,
                event_id: uuid::Uuid::now_v7(),
                stream_id: "s".to_owned(),
                version: position,
                event_type: "test.happened".to_owned(),
                schema_version: 1,
                payload: serde_json::Value::Null,
                occurred_at: chrono::Utc::now(),
                context: es::EventContext::new("test"),
            },
        )
    }

    /// A read after `after` of events `positions`, at `horizon`.
    fn read(
        after: i64,
        positions: std::ops::RangeInclusive<i64>,
        full: bool,
        horizon: u64,
    ) -> Recent {
        Recent {
            after: cursor(after),
            events: Arc::new(positions.map(event).collect()),
            full,
            horizon,
        }
    }

    fn positions(batch: &Batch) -> Vec<i64> {
        batch.events().iter().map(|(c, _)| c.position).collect()
    }

    #[test]
    fn a_fresh_read_answers_from_its_start_or_any_of_its_events() {
        let reads = VecDeque::from([read(0, 1..=5, false, 2000)]);
        let whole = answer(&reads, &cursor(0), 100, 1500).expect("from its start");
        assert_eq!(positions(&whole), [1, 2, 3, 4, 5]);
        assert!(!whole.more && !whole.own);
        let rest = answer(&reads, &cursor(3), 100, 1500).expect("from an event");
        assert_eq!(positions(&rest), [4, 5]);
        assert!(!rest.more);
        // Complete up to its horizon: nothing after its last event.
        let none = answer(&reads, &cursor(5), 100, 1500).expect("at its end");
        assert!(none.events().is_empty() && !none.more);
    }

    #[test]
    fn a_stale_read_is_handed_over_with_more_to_read_but_never_as_the_end() {
        // The follower was woken for a transaction the read did not see.
        let reads = VecDeque::from([read(0, 1..=5, false, 2000)]);
        let rest = answer(&reads, &cursor(2), 100, 2001).expect("its events are right");
        assert_eq!(positions(&rest), [3, 4, 5]);
        assert!(rest.more, "read again at once");
        assert!(answer(&reads, &cursor(5), 100, 2001).is_none());
    }

    #[test]
    fn a_full_read_says_nothing_past_its_end_and_a_limit_cuts_it() {
        let reads = VecDeque::from([read(0, 1..=5, true, 2000)]);
        assert!(answer(&reads, &cursor(5), 100, 1500).is_none());
        let rest = answer(&reads, &cursor(3), 100, 1500).expect("from an event");
        assert_eq!(positions(&rest), [4, 5]);
        assert!(rest.more);
        let fresh = VecDeque::from([read(0, 1..=5, false, 2000)]);
        let cut = answer(&fresh, &cursor(0), 2, 1500).expect("cut");
        assert_eq!(positions(&cut), [1, 2]);
        assert!(cut.more, "the rest of the read follows at once");
    }

    #[test]
    fn after_a_poll_or_off_any_kept_read_the_follower_reads_on_its_own() {
        let reads = VecDeque::from([read(0, 1..=5, false, 2000), read(5, 6..=6, false, 2100)]);
        assert!(
            answer(&reads, &cursor(2), 100, u64::MAX).is_none(),
            "after a poll"
        );
        assert!(
            answer(&reads, &cursor(9), 100, 1500).is_none(),
            "not in any read"
        );
        // The newest read that holds the cursor answers.
        let newest = answer(&reads, &cursor(5), 100, 1500).expect("the next read");
        assert_eq!(positions(&newest), [6]);
        assert_eq!(newest.horizon, 2100);
    }
}
