//! `shopctl status`: what an operator asks first — is every process up and
//! ready, is anything behind (relay, projections, consumers), is anything
//! dead-lettered, is a breaker open — read from the services' admin
//! endpoints (`/readyz`, `/metrics`) and the orders database. Also the
//! progress bar of long operator commands.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::admin;

/// One sample of a Prometheus text exposition: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: f64,
}

/// Parses the Prometheus / OpenMetrics text format (what `/metrics` serves);
/// lines it does not understand are skipped.
pub(crate) fn parse_metrics(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter_map(|pair| {
                    let (key, value) = pair.split_once("=\"")?;
                    Some((key.to_owned(), value.trim_end_matches('"').to_owned()))
                })
                .collect();
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

fn by_label(samples: &[Sample], metric: &str, label: &str) -> Value {
    let map: serde_json::Map<String, Value> = samples
        .iter()
        .filter(|s| s.name == metric)
        .map(|s| {
            (
                s.labels.get(label).cloned().unwrap_or_default(),
                json!(s.value),
            )
        })
        .collect();
    Value::Object(map)
}

fn breaker_name(state: f64) -> &'static str {
    match state as i64 {
        0 => "closed",
        1 => "open",
        _ => "half-open",
    }
}

/// What one service's admin endpoint says.
async fn service_json(http: &reqwest::Client, name: &str, admin: &str) -> Value {
    let ready = match http.get(format!("{admin}/readyz")).send().await {
        Ok(response) => {
            let code = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            json!({ "reachable": true, "ready": code == 200, "detail": body.trim() })
        }
        Err(error) => json!({
            "reachable": false,
            "ready": false,
            "detail": format!("admin endpoint {admin} unreachable: {}", root_cause(&error)),
        }),
    };
    let metrics = match http.get(format!("{admin}/metrics")).send().await {
        Ok(response) => parse_metrics(&response.text().await.unwrap_or_default()),
        Err(_) => Vec::new(),
    };
    let breakers: serde_json::Map<String, Value> = metrics
        .iter()
        .filter(|s| s.name == "shop_circuit_breaker_state")
        .map(|s| {
            (
                s.labels.get("downstream").cloned().unwrap_or_default(),
                json!(breaker_name(s.value)),
            )
        })
        .collect();
    // Followers (relays, projections) this replica runs; the others stand by.
    let leads: Vec<&str> = metrics
        .iter()
        .filter(|s| s.name == "shop_follower_leader" && s.value == 1.0)
        .filter_map(|s| s.labels.get("name").map(String::as_str))
        .collect();
    let dead_letters = metrics
        .iter()
        .find(|s| s.name == "shop_dlq_messages")
        .map(|s| s.value);
    json!({
        "name": name,
        "admin": admin,
        "health": ready,
        "relay_lag_events": by_label(&metrics, "shop_relay_lag_events", "name"),
        "relay_lag_seconds": by_label(&metrics, "shop_relay_lag_seconds", "name"),
        "consumer_pending": by_label(&metrics, "shop_consumer_pending_messages", "name"),
        "dead_letters": dead_letters,
        "breakers": Value::Object(breakers),
        "leads": leads,
    })
}

fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// `shopctl status [--json]`.
pub(crate) async fn show(stack_file: &Path, as_json: bool) -> anyhow::Result<()> {
    let stack = admin::read_stack(stack_file).with_context(|| {
        format!(
            "no running stack at {} (start one with `shopctl up`, or pass --stack-file)",
            stack_file.display()
        )
    })?;
    // reqwest is built without a default TLS provider (the admin endpoints
    // are plain HTTP, but the client wants one anyway).
    platform::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let mut services = Vec::new();
    if stack.instances.is_empty() {
        // A stack file from before replicas.
        for (name, admin_url) in crate::stack::SERVICES.iter().zip(&stack.admin) {
            services.push(service_json(&http, name, admin_url).await);
        }
    }
    for instance in &stack.instances {
        services.push(service_json(&http, &instance.name, &instance.admin).await);
    }
    let projections = match admin::connect_postgres(&stack.orders_database_url).await {
        Ok(pool) => json!(admin::projections_json(&pool).await?),
        Err(error) => json!({ "error": format!("{error:#}") }),
    };
    let processes: Vec<Value> = stack
        .processes
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "pid": p.pid,
                "running": crate::stack::start_ticks(p.pid) == Some(p.start_ticks),
            })
        })
        .collect();
    let report = json!({
        "supervisor_pid": stack.pid,
        "processes": processes,
        "services": services,
        "projections": projections,
    });
    if as_json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    let mut problems: Vec<String> = report["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["running"] != true)
        .map(|p| format!("{} is not running", p["name"].as_str().unwrap_or_default()))
        .collect();
    problems.extend(
        report["services"]
            .as_array()
            .into_iter()
            .flatten()
            // Not ready, or ready but degraded (NATS away, a breaker open):
            // either way an operator wants a non-zero exit.
            .filter(|s| {
                s["health"]["ready"] != true
                    || s["health"]["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("degraded"))
            })
            .map(|s| {
                format!(
                    "{}: {}",
                    s["name"].as_str().unwrap_or_default(),
                    s["health"]["detail"].as_str().unwrap_or_default()
                )
            }),
    );
    if problems.is_empty() {
        Ok(())
    } else {
        // Scripts get a non-zero exit; the report above says the rest.
        Err(anyhow::anyhow!(
            "the stack is not healthy: {}",
            problems.join("; ")
        ))
    }
}

fn print_report(report: &Value) {
    let empty = Vec::new();
    let list = |v: &Value| v.as_array().unwrap_or(&empty).clone();
    out!("Stack of `shopctl up` (pid {})", report["supervisor_pid"]);
    for p in list(&report["processes"]) {
        out!(
            "  {:<22} pid {:<8} {}",
            p["name"].as_str().unwrap_or_default(),
            p["pid"],
            if p["running"].as_bool() == Some(true) {
                "running"
            } else {
                "NOT RUNNING"
            }
        );
    }
    out!("Services:");
    for s in list(&report["services"]) {
        let health = &s["health"];
        out!(
            "  {:<22} {}",
            s["name"].as_str().unwrap_or_default(),
            health["detail"].as_str().unwrap_or_default()
        );
        let leads: Vec<&str> = s["leads"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !leads.is_empty() {
            out!("      leads {}", leads.join(", "));
        }
        for (key, label) in [
            ("relay_lag_events", "relay lag"),
            ("consumer_pending", "consumer backlog"),
        ] {
            if let Some(map) = s[key].as_object() {
                for (name, value) in map {
                    let seconds = if key == "relay_lag_events" {
                        format!(
                            " ({:.1} s)",
                            s["relay_lag_seconds"][name].as_f64().unwrap_or(0.0)
                        )
                    } else {
                        String::new()
                    };
                    out!("      {label} {name}: {value} messages{seconds}");
                }
            }
        }
        if let Some(dead) = s["dead_letters"].as_f64() {
            out!("      dead letters: {dead}");
        }
        if let Some(map) = s["breakers"].as_object() {
            for (downstream, state) in map {
                out!(
                    "      circuit breaker to {downstream}: {}",
                    state.as_str().unwrap_or_default()
                );
            }
        }
    }
    out!("Projections:");
    match &report["projections"] {
        Value::Array(all) => {
            for p in all {
                out!(
                    "  {:<22} {}",
                    p["name"].as_str().unwrap_or_default(),
                    admin::describe_projection(p)
                );
            }
        }
        other => out!("  {}", other["error"].as_str().unwrap_or_default()),
    }
}

/// A one-line progress bar on stderr (only when stderr is a terminal):
/// done, rate and time left.
#[derive(Debug)]
pub(crate) struct Progress {
    enabled: bool,
    drawn: bool,
}

impl Progress {
    pub(crate) fn new(wanted: bool) -> Self {
        Self {
            enabled: wanted && std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// `done` items so far, `left` still to go, after `elapsed`.
    pub(crate) fn show(&mut self, done: i64, left: i64, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        let total = (done + left).max(1);
        let fraction = done as f64 / total as f64;
        let width = 30;
        let filled = ((fraction * width as f64) as usize).min(width);
        let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
        let eta = if rate > 0.0 {
            format!("{:.0} s left", left as f64 / rate)
        } else {
            "—".to_owned()
        };
        let _ = write!(
            std::io::stderr(),
            "\r[{}{}] {:>3.0}%  {done}/{total}  {rate:.0}/s  {eta}   ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            fraction * 100.0
        );
        self.drawn = true;
    }

    pub(crate) fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_is_parsed_into_names_labels_and_values() {
        let text = "# TYPE shop_relay_lag_events gauge\n\
                    shop_relay_lag_events{name=\"order-service\"} 12\n\
                    shop_dlq_messages 3\n\
                    shop_grpc_server_requests_total{method=\"/a.B/C\",code=\"Ok\"} 7\n\
                    # EOF\n";
        let samples = parse_metrics(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].name, "shop_relay_lag_events");
        assert_eq!(samples[0].labels["name"], "order-service");
        assert!((samples[0].value - 12.0).abs() < f64::EPSILON);
        assert_eq!(samples[1].name, "shop_dlq_messages");
        assert!(samples[1].labels.is_empty());
        assert_eq!(samples[2].labels["method"], "/a.B/C");
        assert_eq!(samples[2].labels["code"], "Ok");
    }
}
