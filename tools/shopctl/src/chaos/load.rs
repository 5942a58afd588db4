//! The load a chaos scenario runs under: closed-loop workers, each placing,
//! paying and shipping orders, every command retried with its idempotency
//! key until it is answered (as a careful client would), and a ledger of
//! what each client was told.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use contracts::order::v1::{
    Order as OrderReply, PayOrderRequest, ShipOrderRequest,
    order_service_client::OrderServiceClient,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, transport::Channel};
use uuid::Uuid;

use crate::load::User;

/// The commands of a chaos flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Command {
    Create,
    Pay,
    Ship,
}

impl Command {
    /// The event a successful command appends.
    pub(crate) fn event_type(self) -> &'static str {
        match self {
            Self::Create => "order.created",
            Self::Pay => "order.paid",
            Self::Ship => "order.shipped",
        }
    }
}

/// One command a client was told succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) order_id: Uuid,
    pub(crate) command: Command,
    /// The order's version the answer named.
    pub(crate) version: i64,
    pub(crate) key: String,
}

/// What every client was told, and when.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) acks: Mutex<Vec<Ack>>,
    /// When each successful answer arrived.
    successes: Mutex<Vec<Instant>>,
    /// Failed attempts by gRPC code (each retried).
    pub(crate) errors: Mutex<BTreeMap<String, u64>>,
    /// Commands given up on: no answer within the retry budget, or a
    /// refusal that retrying cannot change.
    pub(crate) abandoned: AtomicU64,
    /// Races where more than one distinct command won the same order
    /// version (must be 0).
    pub(crate) double_wins: AtomicU64,
    /// Races run.
    pub(crate) races: AtomicU64,
}

impl Ledger {
    fn ok(&self, ack: Ack) {
        if let Ok(mut acks) = self.acks.lock() {
            acks.push(ack);
        }
        if let Ok(mut at) = self.successes.lock() {
            at.push(Instant::now());
        }
    }

    fn error(&self, code: Code) {
        if let Ok(mut errors) = self.errors.lock() {
            *errors.entry(format!("{code:?}")).or_default() += 1;
        }
    }

    /// The first successful answer at or after `at`.
    pub(crate) fn first_success_after(&self, at: Instant) -> Option<Duration> {
        let successes = self.successes.lock().ok()?;
        successes
            .iter()
            .filter(|t| **t >= at)
            .min()
            .map(|t| *t - at)
    }

    /// How many commands were acknowledged so far.
    pub(crate) fn acknowledged(&self) -> usize {
        self.acks.lock().map_or(0, |a| a.len())
    }

    pub(crate) fn acks(&self) -> Vec<Ack> {
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// How long one command is retried before the client gives up on it.
const RETRY_BUDGET: Duration = Duration::from_secs(40);
/// Each attempt's deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Codes a retry (with the same key) may change.
fn retryable(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// Calls until answered OK, refused for good, or out of budget.
async fn until_answered<F, Fut>(ledger: &Ledger, mut call: F) -> Option<OrderReply>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<OrderReply>, Status>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        match call().await {
            Ok(Some(order)) => return Some(order),
            Ok(None) => {
                ledger.error(Code::Internal);
                return None;
            }
            Err(status) => {
                ledger.error(status.code());
                if !retryable(status.code()) || started.elapsed() > RETRY_BUDGET {
                    ledger.abandoned.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

fn request<T>(user: &User, message: T) -> Result<tonic::Request<T>, Status> {
    let mut request = crate::demo::authed(&user.token, message)
        .map_err(|e| Status::unauthenticated(format!("token: {e}")))?;
    request.set_timeout(ATTEMPT_TIMEOUT);
    Ok(request)
}

/// A running load.
#[derive(Debug)]
pub(crate) struct Load {
    pub(crate) ledger: Arc<Ledger>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    /// `concurrency` workers over `users`; with `race`, every fourth flow
    /// sends its payment five times at once: three copies with one key and
    /// two rivals with keys of their own, all for the same version.
    pub(crate) fn start(
        orders: &OrderServiceClient<Channel>,
        users: &[User],
        concurrency: usize,
        race: bool,
    ) -> Self {
        let ledger = Arc::new(Ledger::default());
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..concurrency {
            let client = orders.clone();
            let user = users[worker % users.len()].clone();
            let (ledger, stop) = (Arc::clone(&ledger), stop.clone());
            tasks.spawn(async move {
                let mut n = 0_u64;
                while !stop.is_cancelled() {
                    let racing = race && n.is_multiple_of(4);
                    flow(&client, &user, &ledger, &stop, racing, worker, n).await;
                    n += 1;
                }
            });
        }
        Self {
            ledger,
            stop,
            tasks,
        }
    }

    /// Stops starting commands and waits for those in flight (each bounded
    /// by its retry budget).
    pub(crate) async fn finish(mut self) -> Arc<Ledger> {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.ledger
    }
}

async fn flow(
    client: &OrderServiceClient<Channel>,
    user: &User,
    ledger: &Ledger,
    stop: &CancellationToken,
    race: bool,
    worker: usize,
    n: u64,
) {
    let key = Uuid::new_v4().to_string();
    let Some(order) = until_answered(ledger, || {
        let mut client = client.clone();
        let message = crate::demo::sample_order(key.clone());
        async move {
            let reply = client.create_order(request(user, message)?).await?;
            Ok(reply.into_inner().order)
        }
    })
    .await
    else {
        return;
    };
    let Ok(order_id) = Uuid::parse_str(&order.id) else {
        return;
    };
    ledger.ok(Ack {
        order_id,
        command: Command::Create,
        version: order.version,
        key,
    });
    let total = order.total.map_or(0, |t| t.amount_minor);
    if stop.is_cancelled() {
        return;
    }
    let pay = |key: String| {
        let client = client.clone();
        let order_id = order.id.clone();
        move || {
            let mut client = client.clone();
            let message = PayOrderRequest {
                order_id: order_id.clone(),
                payment_reference: format!("chaos-{worker}-{n}"),
                amount_minor: total,
                idempotency_key: key.clone(),
                expected_version: 1,
            };
            async move {
                let reply = client.pay_order(request(user, message)?).await?;
                Ok(reply.into_inner().order)
            }
        }
    };
    let paid = if race {
        ledger.races.fetch_add(1, Ordering::Relaxed);
        let shared = Uuid::new_v4().to_string();
        let keys = [
            shared.clone(),
            shared.clone(),
            shared,
            Uuid::new_v4().to_string(),
            Uuid::new_v4().to_string(),
        ];
        let answers: Vec<Result<Option<OrderReply>, Status>> =
            futures::future::join_all(keys.iter().map(|key| {
                let call = pay(key.clone());
                async move { call().await }
            }))
            .await;
        let mut winners = std::collections::BTreeSet::new();
        let mut first = None;
        for (key, answer) in keys.iter().zip(answers) {
            match answer {
                Ok(Some(order)) => {
                    winners.insert(key.clone());
                    ledger.ok(Ack {
                        order_id,
                        command: Command::Pay,
                        version: order.version,
                        key: key.clone(),
                    });
                    first.get_or_insert(order);
                }
                Ok(None) => ledger.error(Code::Internal),
                Err(status) => ledger.error(status.code()),
            }
        }
        if winners.len() > 1 {
            ledger.double_wins.fetch_add(1, Ordering::Relaxed);
        }
        first
    } else {
        let key = Uuid::new_v4().to_string();
        let paid = until_answered(ledger, pay(key.clone())).await;
        if let Some(order) = &paid {
            ledger.ok(Ack {
                order_id,
                command: Command::Pay,
                version: order.version,
                key,
            });
        }
        paid
    };
    let Some(paid) = paid else { return };
    if stop.is_cancelled() {
        return;
    }
    let key = Uuid::new_v4().to_string();
    let shipped = until_answered(ledger, || {
        let mut client = client.clone();
        let message = ShipOrderRequest {
            order_id: paid.id.clone(),
            carrier: "DHL".to_owned(),
            tracking_number: format!("CHAOS{worker:03}{n:08}"),
            idempotency_key: key.clone(),
            expected_version: paid.version,
        };
        async move {
            let reply = client.ship_order(request(user, message)?).await?;
            Ok(reply.into_inner().order)
        }
    })
    .await;
    if let Some(order) = shipped {
        ledger.ok(Ack {
            order_id,
            command: Command::Ship,
            version: order.version,
            key,
        });
    }
}
