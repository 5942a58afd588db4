//! The gRPC server kit: every service binds, reports health, serves
//! reflection and stops on the shared shutdown token the same way.

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

use crate::StartError;

/// The listener as the incoming stream tonic serves, each accepted socket
/// with `TCP_NODELAY`: a gRPC response is written as headers, data and
/// trailers, and with Nagle's algorithm the last segment waits for the
/// client's delayed ACK (~40 ms) whenever it is not the first one in flight.
pub fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        })
    })
}

/// gRPC reflection (v1) over every `shop.*` package and the health service,
/// so `grpcurl` and Postman can explore the API.
///
/// # Errors
///
/// Fails only if an embedded descriptor set is corrupt.
pub fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    StartError,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(contracts::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?)
}

/// Serves `routes` plus health and reflection on `listener` until `shutdown`
/// fires. Health follows `readiness` (checked every second) for the overall
/// server and `service_name`, and says NOT_SERVING as soon as shutdown
/// starts (so load balancers drain before in-flight calls finish).
///
/// # Errors
///
/// Fails when the transport fails.
pub async fn serve(
    routes: tonic::service::Routes,
    service_name: &'static str,
    listener: TcpListener,
    metrics: crate::metrics::Metrics,
    readiness: crate::admin::Readiness,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service_name, ServingStatus::Serving)
        .await;
    let routes = routes.add_service(health).add_service(reflection()?);
    // The health service tells the same truth as /readyz.
    let follower = {
        let (reporter, shutdown, readiness) =
            (reporter.clone(), shutdown.clone(), readiness.clone());
        tokio::spawn(async move {
            let mut serving = true;
            loop {
                let ready = readiness.problems().is_empty();
                if ready != serving {
                    serving = ready;
                    let status = if ready {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    reporter.set_service_status("", status).await;
                    reporter.set_service_status(service_name, status).await;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        })
    };
    let draining = readiness.clone();
    let stopping = async move {
        shutdown.cancelled().await;
        draining.drain();
        let _ = follower.await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status(service_name, ServingStatus::NotServing)
            .await;
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server
            .tls_config(tls)
            .map_err(|e| StartError::setting("APP_TLS__*", e))?;
    }
    server
        .layer(tower::layer::layer_fn(move |inner| Observe {
            inner,
            metrics: metrics.clone(),
            service: service_name,
            readiness: readiness.clone(),
        }))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming(listener), stopping)
        .await
        .map_err(StartError::Serve)
}

/// Every gRPC method the services define (`/package.Service/Method`), from
/// the embedded descriptors, plus health and reflection.
fn known_methods() -> &'static std::collections::HashSet<String> {
    static KNOWN: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut known = std::collections::HashSet::new();
        for encoded in [
            contracts::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            if let Ok(set) = <prost_types::FileDescriptorSet as prost::Message>::decode(encoded) {
                for file in set.file {
                    for service in &file.service {
                        for method in &service.method {
                            known.insert(format!(
                                "/{}.{}/{}",
                                file.package(),
                                service.name(),
                                method.name()
                            ));
                        }
                    }
                }
            }
        }
        known.insert("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo".to_owned());
        known
    })
}

/// The `method` label of a request path: the path itself for a method the
/// services define, `unknown` for anything else, so made-up paths cannot
/// grow the metrics without bound.
#[must_use]
pub fn method_label(path: &str) -> &str {
    if known_methods().contains(path) {
        path
    } else {
        "unknown"
    }
}

/// An id from a request, fit for a log line: the UUID itself when it parses
/// as one, otherwise only its length. Raw input never reaches the logs, so a
/// newline or ESC in an id cannot forge a line, and a 1 MB id cannot flood.
#[must_use]
pub fn loggable_id(raw: &str) -> String {
    match uuid::Uuid::parse_str(raw.trim()) {
        Ok(id) => id.to_string(),
        Err(_) => format!("<invalid, {} bytes>", raw.len()),
    }
}

/// Request metadata key carrying the caller's correlation id, if any.
pub const CORRELATION_ID: &str = "x-correlation-id";

/// The correlation id sent by the caller, or a fresh one.
#[must_use]
pub fn correlation_id(metadata: &tonic::metadata::MetadataMap) -> uuid::Uuid {
    metadata
        .get(CORRELATION_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok())
        .unwrap_or_else(uuid::Uuid::now_v7)
}

/// The caller's W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if it sent
/// a well-formed one. Stored with every event the call writes, so the trace
/// continues through the outbox and NATS.
#[must_use]
pub fn traceparent(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let value = metadata.get("traceparent")?.to_str().ok()?.trim();
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let well_formed = parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1] != "0".repeat(32)
        && hex(parts[2], 16)
        && parts[2] != "0".repeat(16)
        && hex(parts[3], 2);
    well_formed.then(|| value.to_ascii_lowercase())
}

/// The deadline of the request being served, from its `grpc-timeout` header
/// (`<digits><unit>`, unit one of `H M S m u n`), counted from now. Calls made
/// while serving it pass on what remains.
#[must_use]
pub fn incoming_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<tokio::time::Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    let now = tokio::time::Instant::now();
    Some(
        now.checked_add(timeout)
            .unwrap_or(now + MAX_INCOMING_TIMEOUT),
    )
}

/// The longest deadline a caller can ask for; longer ones (and values with
/// more digits than the gRPC spec allows) are treated as this.
pub const MAX_INCOMING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Parses a `grpc-timeout` header value as the gRPC spec defines it: one to
/// eight ASCII digits, then a unit (`H`, `M`, `S`, `m`, `u`, `n`). Untrusted
/// input: no arithmetic here can overflow or panic. More than eight digits is
/// out of range and means [`MAX_INCOMING_TIMEOUT`]; anything else malformed
/// is `None` (no deadline from the caller).
#[must_use]
pub fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let per_unit = match unit {
        'H' => Duration::from_secs(3600),
        'M' => Duration::from_secs(60),
        'S' => Duration::from_secs(1),
        'm' => Duration::from_millis(1),
        'u' => Duration::from_micros(1),
        'n' => Duration::from_nanos(1),
        _ => return None,
    };
    if digits.len() > 8 {
        return Some(MAX_INCOMING_TIMEOUT);
    }
    let amount: u32 = digits.parse().ok()?;
    Some(
        per_unit
            .checked_mul(amount)
            .unwrap_or(MAX_INCOMING_TIMEOUT)
            .min(MAX_INCOMING_TIMEOUT),
    )
}

/// Everything one service runs, driven by one shutdown token.
#[derive(Debug)]
pub struct Service {
    /// gRPC routes of the service itself (health and reflection are added).
    pub routes: tonic::service::Routes,
    /// Fully-qualified name of its gRPC service, for health.
    pub name: &'static str,
    pub listener: TcpListener,
    pub admin: crate::admin::AdminServer,
    pub metrics: crate::metrics::Metrics,
    pub readiness: crate::admin::Readiness,
    /// TLS of the gRPC port (`APP_TLS__*`); `None`: plaintext.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Relays, projections, consumers: they stop when `shutdown` fires.
    pub background: Vec<tokio::task::JoinHandle<()>>,
}

impl Service {
    /// Serves gRPC and the admin port until `shutdown` fires (or gRPC fails,
    /// which fires it), then waits for the background tasks.
    ///
    /// # Errors
    ///
    /// When the gRPC transport fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StartError> {
        let admin = tokio::spawn(self.admin.serve(
            self.metrics.clone(),
            self.readiness.clone(),
            shutdown.clone(),
        ));
        let watch = tokio::spawn(
            self.readiness
                .clone()
                .watch(self.metrics.clone(), shutdown.clone()),
        );
        let result = serve(
            self.routes,
            self.name,
            self.listener,
            self.metrics,
            self.readiness,
            self.tls,
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        for task in self.background.into_iter().chain([admin, watch]) {
            if let Err(error) = task.await {
                tracing::error!(%error, "background task failed");
            }
        }
        result
    }
}

/// Observes every call: logs (target `shop::deadline`, level debug) the
/// deadline it arrived with, and records its method, status code and latency
/// in the metrics. The code is the `grpc-status` of a trailers-only response
/// (how tonic answers errors), else OK.
#[derive(Debug, Clone)]
struct Observe<S> {
    inner: S,
    metrics: crate::metrics::Metrics,
    service: &'static str,
    /// Calls that need Postgres fail fast while it is known to be down.
    readiness: crate::admin::Readiness,
}

/// Methods that work without Postgres: health, reflection, and token
/// validation (a signature check).
fn needs_database(path: &str) -> bool {
    !(path.starts_with("/grpc.health.")
        || path.starts_with("/grpc.reflection.")
        || path == "/shop.user.v1.UserService/ValidateToken")
}

impl<S, B, R> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path()).to_owned();
        if let Some(value) = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
        {
            let remaining_ms =
                parse_grpc_timeout(value).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            tracing::debug!(target: "shop::deadline", method, grpc_timeout = value, remaining_ms, "incoming deadline");
        }
        let started = std::time::Instant::now();
        let metrics = self.metrics.clone();
        if self.readiness.postgres_down() && needs_database(request.uri().path()) {
            metrics.grpc_served(&method, "Unavailable", 0.0);
            let (parts, ()) = tonic::Status::unavailable("database unreachable; retry later")
                .into_http::<()>()
                .into_parts();
            return Box::pin(std::future::ready(Ok(http::Response::from_parts(
                parts,
                R::default(),
            ))));
        }
        // The server span continues the caller's trace (W3C traceparent).
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            shop.service = self.service,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
        );
        crate::trace::set_parent(&span, crate::trace::extract(request.headers()));
        let response = span.in_scope(|| self.inner.call(request));
        let observed = async move {
            let response = response.await;
            if let Ok(response) = &response {
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from);
                metrics.grpc_served(
                    &method,
                    &format!("{code:?}"),
                    started.elapsed().as_secs_f64(),
                );
            }
            response
        };
        Box::pin(tracing::Instrument::instrument(observed, span))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_defined_methods_are_metric_labels() {
        assert_eq!(
            method_label("/shop.order.v1.OrderService/CreateOrder"),
            "/shop.order.v1.OrderService/CreateOrder"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        for made_up in ["/shop.order.v1.OrderService/Probe1", "/x/y", "", "/a\nb"] {
            assert_eq!(method_label(made_up), "unknown", "{made_up:?}");
        }
    }

    #[test]
    fn only_parsed_ids_reach_the_logs() {
        let id = uuid::Uuid::new_v4();
        assert_eq!(loggable_id(&id.to_string()), id.to_string());
        assert_eq!(
            loggable_id("x\n2026-12-02T00:00:00Z ERROR forged"),
            "<invalid, 35 bytes>"
        );
        assert_eq!(
            loggable_id(&"a".repeat(1 << 20)),
            "<invalid, 1048576 bytes>"
        );
    }

    #[test]
    fn grpc_timeouts_parse_as_the_spec_defines_them() {
        assert_eq!(parse_grpc_timeout("500u"), Some(Duration::from_micros(500)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("99999999m"), Some(MAX_INCOMING_TIMEOUT));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in [
            "", "S", "5", "5x", "-5S", "+5S", " 5S", "5 S", "1é", "é", "5SS",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn out_of_range_timeouts_are_the_server_maximum_and_never_overflow() {
        // The header that panicked `Instant::now() + timeout`.
        assert_eq!(
            parse_grpc_timeout("18446744073709551615S"),
            Some(MAX_INCOMING_TIMEOUT)
        );
        assert_eq!(parse_grpc_timeout("99999999H"), Some(MAX_INCOMING_TIMEOUT));
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert(
            "grpc-timeout",
            "18446744073709551615S".parse().expect("ascii"),
        );
        let deadline = incoming_deadline(&metadata).expect("a deadline");
        assert!(deadline <= tokio::time::Instant::now() + MAX_INCOMING_TIMEOUT);
    }

    proptest::proptest! {
        #[test]
        fn no_grpc_timeout_header_panics(value in "\\PC{0,24}") {
            let _ = parse_grpc_timeout(&value);
            if let Ok(header) = value.parse() {
                let mut metadata = tonic::metadata::MetadataMap::new();
                metadata.insert("grpc-timeout", header);
                let _ = incoming_deadline(&metadata);
            }
        }
    }
}
