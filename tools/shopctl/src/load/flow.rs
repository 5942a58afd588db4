//! The flows a load run drives: each a sequence of steps on one new order,
//! and the loops (closed and open) that start them.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use contracts::order::v1::{
    CancelOrderRequest, DeliverOrderRequest, GetOrderRequest, ListOrdersRequest, PayOrderRequest,
    ShipOrderRequest,
};
use uuid::Uuid;

use super::{Clients, Sample, Shared, User};

/// One call of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Step {
    Create,
    Pay,
    Ship,
    Deliver,
    Cancel,
    Get,
    List,
}

impl Step {
    pub(crate) const ALL: [Self; 7] = [
        Self::Create,
        Self::Pay,
        Self::Ship,
        Self::Deliver,
        Self::Cancel,
        Self::Get,
        Self::List,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Pay => "pay",
            Self::Ship => "ship",
            Self::Deliver => "deliver",
            Self::Cancel => "cancel",
            Self::Get => "get",
            Self::List => "list",
        }
    }

    /// Whether the step is a command (appends an event).
    pub(crate) fn is_command(self) -> bool {
        !matches!(self, Self::Get | Self::List)
    }

    /// The integration event the step's command causes, if it notifies.
    fn notifies(self) -> Option<&'static str> {
        match self {
            Self::Create => Some("order.created"),
            Self::Pay => Some("order.paid"),
            Self::Ship => Some("order.shipped"),
            Self::Cancel => Some("order.cancelled"),
            Self::Deliver | Self::Get | Self::List => None,
        }
    }

    fn parse(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|s| s.name() == text)
            .ok_or_else(|| {
                format!(
                    "unknown step {text:?}; steps: create, pay, ship, deliver, cancel, get, list"
                )
            })
    }
}

/// The event-type string of a notification, as a static name we track.
pub(crate) fn event_type(name: &str) -> Option<&'static str> {
    Step::ALL
        .into_iter()
        .filter_map(Step::notifies)
        .find(|e| *e == name)
}

/// Weighted flows, e.g. `create,pay,ship:3 create,cancel:1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mix {
    /// Each flow repeated `weight` times: picking round robin honours weights.
    wheel: Vec<Arc<[Step]>>,
    text: String,
}

impl std::str::FromStr for Mix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut wheel = Vec::new();
        for flow in text.split_whitespace() {
            let (steps, weight) = match flow.rsplit_once(':') {
                Some((steps, weight)) => (
                    steps,
                    weight
                        .parse::<usize>()
                        .ok()
                        .filter(|w| (1..=100).contains(w))
                        .ok_or_else(|| format!("weight {weight:?} must be 1..=100"))?,
                ),
                None => (flow, 1),
            };
            let steps = steps
                .split(',')
                .map(Step::parse)
                .collect::<Result<Vec<_>, _>>()?;
            if steps.first() != Some(&Step::Create) {
                return Err(format!("flow {flow:?} must start with create"));
            }
            let steps: Arc<[Step]> = steps.into();
            wheel.extend(std::iter::repeat_n(steps, weight));
        }
        if wheel.is_empty() {
            return Err("the mix is empty".to_owned());
        }
        Ok(Self {
            wheel,
            text: text.trim().to_owned(),
        })
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Mix {
    fn pick(&self, n: u64) -> Arc<[Step]> {
        Arc::clone(&self.wheel[(n % self.wheel.len() as u64) as usize])
    }

    /// Commands per flow, averaged over the wheel.
    pub(crate) fn steps_per_flow(&self) -> f64 {
        let total: usize = self.wheel.iter().map(|f| f.len()).sum();
        total as f64 / self.wheel.len() as f64
    }
}

/// What every flow needs.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) t0: Instant,
    pub(crate) end: Instant,
    pub(crate) mix: Arc<Mix>,
    pub(crate) users: Arc<Vec<User>>,
    pub(crate) clients: Arc<Vec<Clients>>,
    pub(crate) read_sample: u64,
}

fn code(result: &Result<(), tonic::Status>) -> Option<tonic::Code> {
    result.as_ref().err().map(tonic::Status::code)
}

/// Runs one flow; `planned` is when an open loop meant to start it.
async fn one_flow(plan: &Plan, shared: &Shared, n: u64, planned: Option<Instant>) {
    let steps = plan.mix.pick(n);
    let user = &plan.users[(n % plan.users.len() as u64) as usize];
    let mut orders = plan.clients[(n % plan.clients.len() as u64) as usize]
        .orders
        .clone();
    let mut order_id = String::new();
    let mut order_uuid = Uuid::nil();
    let mut version = 0;
    let mut total = 0;
    let mut position = 0;
    for (i, step) in steps.iter().copied().enumerate() {
        let started = if i == 0 {
            planned.unwrap_or_else(Instant::now)
        } else {
            Instant::now()
        };
        let key = Uuid::new_v4().to_string();
        let result: Result<(), tonic::Status> = async {
            let bad = |e: anyhow::Error| tonic::Status::internal(e.to_string());
            match step {
                Step::Create => {
                    let created = orders
                        .create_order(
                            crate::demo::authed(&user.token, crate::demo::sample_order(key))
                                .map_err(bad)?,
                        )
                        .await?
                        .into_inner();
                    let order = created.order.unwrap_or_default();
                    order_uuid = Uuid::parse_str(&order.id).unwrap_or_default();
                    order_id = order.id;
                    version = order.version;
                    total = order.total.map_or(0, |t| t.amount_minor);
                    position = created.position;
                }
                Step::Pay => {
                    let paid = orders
                        .pay_order(
                            crate::demo::authed(
                                &user.token,
                                PayOrderRequest {
                                    order_id: order_id.clone(),
                                    payment_reference: format!("load-{n}"),
                                    amount_minor: total,
                                    idempotency_key: key,
                                    expected_version: version,
                                },
                            )
                            .map_err(bad)?,
                        )
                        .await?
                        .into_inner();
                    version = paid.order.map_or(version, |o| o.version);
                    position = paid.position;
                }
                Step::Ship => {
                    let shipped = orders
                        .ship_order(
                            crate::demo::authed(
                                &user.token,
                                ShipOrderRequest {
                                    order_id: order_id.clone(),
                                    carrier: "DHL".to_owned(),
                                    tracking_number: format!("LOAD{n:010}"),
                                    idempotency_key: key,
                                    expected_version: version,
                                },
                            )
                            .map_err(bad)?,
                        )
                        .await?
                        .into_inner();
                    version = shipped.order.map_or(version, |o| o.version);
                    position = shipped.position;
                }
                Step::Deliver => {
                    let delivered = orders
                        .deliver_order(
                            crate::demo::authed(
                                &user.token,
                                DeliverOrderRequest {
                                    order_id: order_id.clone(),
                                    idempotency_key: key,
                                    expected_version: version,
                                },
                            )
                            .map_err(bad)?,
                        )
                        .await?
                        .into_inner();
                    version = delivered.order.map_or(version, |o| o.version);
                    position = delivered.position;
                }
                Step::Cancel => {
                    let cancelled = orders
                        .cancel_order(
                            crate::demo::authed(
                                &user.token,
                                CancelOrderRequest {
                                    order_id: order_id.clone(),
                                    reason: "load test".to_owned(),
                                    idempotency_key: key,
                                    expected_version: version,
                                },
                            )
                            .map_err(bad)?,
                        )
                        .await?
                        .into_inner();
                    version = cancelled.order.map_or(version, |o| o.version);
                    position = cancelled.position;
                }
                Step::Get => {
                    orders
                        .get_order(
                            crate::demo::authed(
                                &user.token,
                                GetOrderRequest {
                                    order_id: order_id.clone(),
                                    min_position: position,
                                },
                            )
                            .map_err(bad)?,
                        )
                        .await?;
                }
                Step::List => {
                    orders
                        .list_orders(
                            crate::demo::authed(
                                &user.token,
                                ListOrdersRequest {
                                    status: 0,
                                    page_size: 20,
                                    page_token: String::new(),
                                    min_position: 0,
                                },
                            )
                            .map_err(bad)?,
                        )
                        .await?;
                }
            }
            Ok(())
        }
        .await;
        let now = Instant::now();
        let failed = result.is_err();
        shared.record(Sample {
            at: now - plan.t0,
            step,
            latency: now - started,
            code: code(&result),
        });
        if failed {
            return;
        }
        if let Some(event) = step.notifies() {
            shared.accepted(order_uuid, event, now);
        }
        if step == Step::Create && plan.read_sample > 0 {
            let nth = shared.creates.fetch_add(1, Ordering::Relaxed);
            if nth.is_multiple_of(plan.read_sample) {
                read_model_lag(plan, shared, &mut orders, user, &order_id, position, now).await;
            }
        }
    }
}

/// Accepted -> the read model includes the write: a `GetOrder` that waits
/// for `position` (the server answers as soon as its projection has it).
async fn read_model_lag(
    plan: &Plan,
    shared: &Shared,
    orders: &mut contracts::order::v1::order_service_client::OrderServiceClient<
        tonic::transport::Channel,
    >,
    user: &User,
    order_id: &str,
    position: i64,
    accepted: Instant,
) {
    let Ok(request) = crate::demo::authed(
        &user.token,
        GetOrderRequest {
            order_id: order_id.to_owned(),
            min_position: position,
        },
    ) else {
        return;
    };
    if orders.get_order(request).await.is_ok() {
        let now = Instant::now();
        if let Ok(mut lags) = shared.read_model.lock() {
            lags.push((now - plan.t0, now - accepted));
        }
    }
}

/// A worker: flow after flow until the plan ends.
pub(crate) async fn closed_loop(plan: Plan, shared: Arc<Shared>, worker: usize) {
    let mut n = worker as u64;
    let stride = 1_000_003;
    while Instant::now() < plan.end {
        one_flow(&plan, &shared, n, None).await;
        n += stride;
    }
}

/// Starts flows at `rate` commands per second until the plan ends, each in
/// its own task; beyond `max_in_flight` a start is dropped and counted.
pub(crate) async fn open_loop(plan: Plan, shared: Arc<Shared>, rate: f64, max_in_flight: usize) {
    let interval = Duration::from_secs_f64(plan.mix.steps_per_flow() / rate);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = Instant::now();
    let mut n = 0_u64;
    while next < plan.end {
        tokio::time::sleep_until(next.into()).await;
        while tasks.try_join_next().is_some() {}
        match Arc::clone(&in_flight).try_acquire_owned() {
            Ok(permit) => {
                let (plan, shared, planned) = (plan.clone(), Arc::clone(&shared), next);
                tasks.spawn(async move {
                    one_flow(&plan, &shared, n, Some(planned)).await;
                    drop(permit);
                });
            }
            Err(_) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        n += 1;
        next += interval;
    }
    while tasks.join_next().await.is_some() {}
}
