//! One telemetry setup for every service.
//!
//! - Logs: `RUST_LOG` filtering (default `info`), JSON lines when
//!   `APP_LOG_FORMAT=json` (production, with the current span's fields),
//!   compact human-readable lines otherwise (the local stack), on stderr
//!   (stdout belongs to the program; shopctl prints its story there).
//! - Traces: OpenTelemetry over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED`
//!   is not `true`; off otherwise. The standard `OTEL_*` variables apply
//!   (`OTEL_SERVICE_NAME`, `OTEL_BSP_SCHEDULE_DELAY`, ...). W3C trace context
//!   is the propagation format. An `https` endpoint is TLS, trusting the
//!   system roots or `OTEL_EXPORTER_OTLP_CERTIFICATE` (a CA file), with
//!   `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` + `…_CLIENT_KEY` for mutual TLS
//!   (the `TRACES_` variants take precedence), as the OTLP spec defines.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::{
    EnvFilter, Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

/// The variables of logging and tracing every service reads (beside its
/// `APP_*` settings), with their defaults.
pub const ENV: &[(&str, &str)] = &[
    ("RUST_LOG", "info"),
    ("APP_LOG_FORMAT", "text"),
    ("OTEL_SDK_DISABLED", "false"),
    ("OTEL_SERVICE_NAME", ""),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "10000"),
    ("OTEL_EXPORTER_OTLP_HEADERS", ""),
    ("OTEL_EXPORTER_OTLP_CERTIFICATE", ""),
    ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", ""),
    ("OTEL_EXPORTER_OTLP_CLIENT_KEY", ""),
    ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", ""),
    ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE", ""),
    ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", ""),
    ("OTEL_RESOURCE_ATTRIBUTES", ""),
    ("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
    ("OTEL_TRACES_SAMPLER_ARG", ""),
    ("OTEL_BSP_SCHEDULE_DELAY", "5000"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "2048"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512"),
    ("OTEL_BSP_EXPORT_TIMEOUT", "30000"),
];

/// Keeps the tracer provider alive; call [`Telemetry::shutdown`] before
/// exiting so buffered spans are exported.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops span export.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "flushing traces failed");
        }
    }
}

fn tracing_enabled() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(service: &str) -> Option<SdkTracerProvider> {
    if !tracing_enabled() {
        return None;
    }
    let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    let builder = match otlp_tls() {
        Ok(Some(tls)) => {
            use opentelemetry_otlp::WithTonicConfig as _;
            builder.with_tls_config(tls)
        }
        Ok(None) => builder,
        Err(error) => {
            eprintln!("OpenTelemetry export disabled: {error}");
            return None;
        }
    };
    let exporter = match builder.build() {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OpenTelemetry export disabled: {error}");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build(),
    )
}

/// The OTLP spec's variable for traces, or its general form.
fn otlp_var(suffix: &str) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_TRACES_{suffix}"),
        format!("OTEL_EXPORTER_OTLP_{suffix}"),
    ]
    .into_iter()
    .find_map(|name| {
        let value = std::env::var(&name).ok()?;
        (!value.trim().is_empty()).then(|| (name, value.trim().to_owned()))
    })
}

/// TLS of the exporter when the endpoint is `https` (else `None`).
fn otlp_tls() -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    let https = otlp_var("ENDPOINT").is_some_and(|(_, url)| url.starts_with("https://"));
    if !https {
        let tls_vars = ["CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"];
        if let Some((name, _)) = tls_vars.iter().find_map(|v| otlp_var(v)) {
            return Err(format!("{name} is set but the OTLP endpoint is not https"));
        }
        return Ok(None);
    }
    crate::tls::install_crypto_provider();
    let read = |(name, path): (String, String)| {
        std::fs::read(&path).map_err(|e| format!("{name} {path}: {e}"))
    };
    let mut tls = tonic::transport::ClientTlsConfig::new();
    tls = match otlp_var("CERTIFICATE") {
        Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?)),
        None => tls.with_native_roots(),
    };
    match (otlp_var("CLIENT_CERTIFICATE"), otlp_var("CLIENT_KEY")) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _CLIENT_KEY must be set together"
                    .to_owned(),
            );
        }
    }
    Ok(Some(tls))
}

/// Installs logging and, when configured, trace export. Calling it twice
/// is harmless (tests).
#[must_use]
pub fn init(service: &str) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn,h2=warn,tower=warn"));
    let json = std::env::var("APP_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt::layer()
            .compact()
            .with_target(false)
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed()
    };
    let provider = tracer_provider(service);
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_owned())));
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init();
    if result.is_err() {
        return Telemetry::default();
    }
    if let Some(provider) = &provider {
        opentelemetry::global::set_tracer_provider(provider.clone());
        tracing::info!(service, "exporting traces over OTLP");
    }
    Telemetry { provider }
}
