//! An SVG plot of a load run: commands per second (top) and latency p50 /
//! p99 and end-to-end p99 (bottom) over the measured seconds. Hand-written
//! SVG: no plotting dependency for two line charts.

use std::fmt::Write as _;

use super::report::Report;

const WIDTH: f64 = 900.0;
const PANEL: f64 = 220.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;

fn nice_max(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10_f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if value <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn polyline(svg: &mut String, points: &[(f64, f64)], colour: &str) {
    if points.is_empty() {
        return;
    }
    let path: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let _ = writeln!(
        svg,
        r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
        path.join(" ")
    );
}

/// A line: label, colour, (second, value) points.
type Series<'a> = (&'a str, &'a str, Vec<(u64, f64)>);

/// One panel with axes and its lines.
fn panel(svg: &mut String, top: f64, title: &str, unit: &str, seconds: u64, series: &[Series<'_>]) {
    let max = nice_max(
        series
            .iter()
            .flat_map(|(_, _, v)| v.iter().map(|(_, y)| *y))
            .fold(0.0, f64::max),
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let x = |s: u64| LEFT + plot_w * (s as f64 + 0.5) / seconds.max(1) as f64;
    let y = |v: f64| top + PANEL - PANEL * (v / max);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{:.0}" font-size="14" font-weight="bold">{title}</text>"#,
        top - 8.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let value = max * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{:.0}" y="{:.1}" font-size="11" text-anchor="end">{value:.0} {unit}</text><line x1="{LEFT}" x2="{:.0}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            LEFT - 4.0,
            y(value) + 4.0,
            WIDTH - RIGHT,
            y(value),
            y(value)
        );
    }
    let mut legend_x = LEFT + 10.0;
    for (label, colour, values) in series {
        let points: Vec<(f64, f64)> = values.iter().map(|(s, v)| (x(*s), y(*v))).collect();
        polyline(svg, &points, colour);
        let _ = writeln!(
            svg,
            r#"<text x="{legend_x:.0}" y="{:.0}" font-size="12" fill="{colour}">{label}</text>"#,
            top + 16.0
        );
        legend_x += 160.0;
    }
}

/// The plot as an SVG document.
pub(crate) fn svg(report: &Report) -> String {
    let seconds = report.timeline.last().map_or(1, |s| s.second + 1);
    let height = 2.0 * PANEL + 110.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let per_second = |f: &dyn Fn(&super::report::Second) -> Option<f64>| -> Vec<(u64, f64)> {
        report
            .timeline
            .iter()
            .filter_map(|s| f(s).map(|v| (s.second, v)))
            .collect()
    };
    panel(
        &mut svg,
        30.0,
        &format!(
            "Throughput ({}, mix {})",
            report.settings.mode, report.settings.mix
        ),
        "/s",
        seconds,
        &[
            (
                "commands/s",
                "#1f77b4",
                per_second(&|s| Some(s.commands as f64)),
            ),
            (
                "errors/s",
                "#d62728",
                per_second(&|s| Some(s.errors as f64)),
            ),
        ],
    );
    panel(
        &mut svg,
        PANEL + 80.0,
        "Latency per second",
        "ms",
        seconds,
        &[
            ("call p50", "#2ca02c", per_second(&|s| Some(s.p50_ms))),
            ("call p99", "#ff7f0e", per_second(&|s| Some(s.p99_ms))),
            (
                "notification e2e p99",
                "#9467bd",
                per_second(&|s| s.e2e_p99_ms),
            ),
        ],
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{:.0}" font-size="11">seconds of the measured window (0 … {seconds})</text>"#,
        height - 10.0
    );
    svg.push_str("</svg>\n");
    svg
}
