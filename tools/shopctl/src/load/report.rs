//! The load run's report: per-command latency (HDR histograms), errors by
//! gRPC code, throughput, end-to-end latencies, a per-second timeline; as
//! JSON for machines, Markdown for people and an SVG plot.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{Shared, flow::Step};

/// How the run was configured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Settings {
    pub(crate) mode: String,
    pub(crate) concurrency: Option<usize>,
    pub(crate) rate: Option<f64>,
    #[serde(serialize_with = "seconds")]
    pub(crate) warmup: Duration,
    #[serde(serialize_with = "seconds")]
    pub(crate) duration: Duration,
    pub(crate) mix: String,
    pub(crate) users: usize,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, 3_600_000_000)
}

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Latency {
        count: h.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    }
}

/// One command's figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StepReport {
    pub(crate) step: Step,
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) latency: Latency,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Second {
    pub(crate) second: u64,
    pub(crate) commands: u64,
    pub(crate) errors: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) e2e_p99_ms: Option<f64>,
}

/// Everything a run measured (the measured window only, warm-up excluded).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub(crate) settings: Settings,
    /// Successful commands (queries excluded) per second.
    pub(crate) commands_per_second: f64,
    pub(crate) calls_per_second: f64,
    pub(crate) commands_ok: u64,
    /// Successful commands over the whole run, warm-up included (what the
    /// system did work for; the benchmark divides CPU time by it).
    pub(crate) commands_total: u64,
    pub(crate) errors: u64,
    pub(crate) errors_by_code: BTreeMap<String, u64>,
    /// Open loop: starts dropped because too many flows were in flight.
    pub(crate) dropped_starts: u64,
    pub(crate) steps: Vec<StepReport>,
    /// Command accepted -> its notification streamed to the client.
    pub(crate) notification_e2e: Latency,
    /// Accepted commands whose notification never arrived (after the drain).
    pub(crate) notifications_missing: u64,
    /// Command accepted -> read model includes it (sampled creates).
    pub(crate) read_model_e2e: Latency,
    pub(crate) timeline: Vec<Second>,
}

/// Folds the samples of the measured window into a report.
pub(crate) fn build(shared: &Shared, settings: &Settings, t0: std::time::Instant) -> Report {
    let from = settings.warmup;
    let to = settings.warmup + settings.duration;
    let window = |at: Duration| at >= from && at < to;
    let samples = shared.samples.lock().map(|s| s.clone()).unwrap_or_default();
    let mut per_step: BTreeMap<Step, (u64, u64, Histogram<u64>)> = BTreeMap::new();
    let mut errors_by_code = BTreeMap::new();
    let mut seconds: BTreeMap<u64, (u64, u64, Histogram<u64>)> = BTreeMap::new();
    let (mut commands_ok, mut calls_ok, mut errors) = (0, 0, 0);
    for sample in samples.iter().filter(|s| window(s.at)) {
        let entry = per_step
            .entry(sample.step)
            .or_insert_with(|| (0, 0, histogram()));
        let second = seconds
            .entry((sample.at - from).as_secs())
            .or_insert_with(|| (0, 0, histogram()));
        match sample.code {
            None => {
                entry.0 += 1;
                calls_ok += 1;
                if sample.step.is_command() {
                    commands_ok += 1;
                    second.0 += 1;
                }
                let _ = entry.2.record(micros(sample.latency));
                let _ = second.2.record(micros(sample.latency));
            }
            Some(code) => {
                entry.1 += 1;
                second.1 += 1;
                errors += 1;
                *errors_by_code.entry(format!("{code:?}")).or_insert(0) += 1;
            }
        }
    }
    // End to end: events accepted inside the window.
    let mut e2e = histogram();
    let mut e2e_seconds: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    let mut missing = 0;
    let window_start = from;
    if let Ok(events) = shared.events.lock() {
        for (accepted, notified) in events.values() {
            let Some(accepted) = accepted else { continue };
            let at = accepted.checked_duration_since(t0);
            if !at.is_some_and(window) {
                continue;
            }
            match notified {
                Some(notified) => {
                    let lag = notified.saturating_duration_since(*accepted);
                    let _ = e2e.record(micros(lag));
                    if let Some(at) = at {
                        let _ = e2e_seconds
                            .entry((at - window_start).as_secs())
                            .or_insert_with(histogram)
                            .record(micros(lag));
                    }
                }
                None => missing += 1,
            }
        }
    }
    let mut read_model = histogram();
    if let Ok(lags) = shared.read_model.lock() {
        for (_, lag) in lags.iter().filter(|(at, _)| window(*at)) {
            let _ = read_model.record(micros(*lag));
        }
    }
    let secs = settings.duration.as_secs_f64().max(0.001);
    Report {
        settings: settings.clone(),
        commands_per_second: commands_ok as f64 / secs,
        calls_per_second: calls_ok as f64 / secs,
        commands_ok,
        commands_total: samples
            .iter()
            .filter(|s| s.code.is_none() && s.step.is_command())
            .count() as u64,
        errors,
        errors_by_code,
        dropped_starts: shared.dropped.load(std::sync::atomic::Ordering::Relaxed),
        steps: per_step
            .into_iter()
            .map(|(step, (ok, errors, h))| StepReport {
                step,
                ok,
                errors,
                latency: latency(&h),
            })
            .collect(),
        notification_e2e: latency(&e2e),
        notifications_missing: missing,
        read_model_e2e: latency(&read_model),
        timeline: seconds
            .into_iter()
            .map(|(second, (commands, errors, h))| Second {
                second,
                commands,
                errors,
                p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
                e2e_p99_ms: e2e_seconds
                    .get(&second)
                    .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0),
            })
            .collect(),
    }
}

/// The report for people.
pub(crate) fn markdown(report: &Report) -> String {
    use std::fmt::Write as _;
    let s = &report.settings;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Load run: {}, mix `{}`, {} users, {:.0} s measured after {:.0} s warm-up\n",
        s.mode,
        s.mix,
        s.users,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "**{:.0} commands/s** ({} ok, {} errors{}){}\n",
        report.commands_per_second,
        report.commands_ok,
        report.errors,
        if report.errors_by_code.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                report
                    .errors_by_code
                    .iter()
                    .map(|(code, n)| format!("{code} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
        if report.dropped_starts > 0 {
            format!("; {} flow starts dropped (overload)", report.dropped_starts)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        md,
        "| call | ok | errors | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let row = |md: &mut String, name: &str, ok: u64, errors: Option<u64>, l: &Latency| {
        let _ = writeln!(
            md,
            "| {name} | {ok} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            errors.map_or_else(|| "-".to_owned(), |e| e.to_string()),
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms
        );
    };
    for step in &report.steps {
        row(
            &mut md,
            step.step.name(),
            step.ok,
            Some(step.errors),
            &step.latency,
        );
    }
    row(
        &mut md,
        "accepted -> notification streamed",
        report.notification_e2e.count,
        Some(report.notifications_missing),
        &report.notification_e2e,
    );
    row(
        &mut md,
        "accepted -> read model (sampled)",
        report.read_model_e2e.count,
        None,
        &report.read_model_e2e,
    );
    let _ = writeln!(
        md,
        "\n(errors of the notification row: accepted commands whose notification never arrived)"
    );
    md
}

/// Writes `load.json`, `load.md` and `load.svg` into `dir`.
///
/// # Errors
///
/// When the files cannot be written.
pub(crate) fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("load.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(dir.join("load.md"), markdown(report))?;
    std::fs::write(dir.join("load.svg"), super::plot::svg(report))?;
    Ok(())
}
