//! The observability files are consistent with what the services export:
//! every metric the dashboard and the alerts query is documented in the
//! README, and the dashboard is valid JSON with a query per panel.

use std::{collections::BTreeSet, path::PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `shop_*` metric names in a text, histogram series folded to their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("shop_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(family.to_owned());
        rest = &tail[end..];
    }
    names
}

pub(crate) fn documented() -> anyhow::Result<BTreeSet<String>> {
    let readme = std::fs::read_to_string(root().join("README.md"))?;
    Ok(readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("shop_"))
        .map(ToOwned::to_owned)
        .collect())
}

#[test]
fn the_dashboard_queries_only_documented_metrics() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(root().join("deploy/observability/grafana/shop.json"))?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut queried = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has a query", panel["title"]);
        for target in targets {
            queried.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    let documented = documented()?;
    let missing: Vec<_> = queried.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries undocumented metrics: {missing:?}"
    );
    assert!(
        queried.contains("shop_events_published_total")
            && queried.contains("shop_grpc_server_request_duration_seconds")
    );
    Ok(())
}

#[test]
fn the_alerts_query_only_documented_metrics() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(root().join("deploy/observability/alerts.yml"))?;
    let queried = metric_names(&text);
    let documented = documented()?;
    let missing: Vec<_> = queried.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "alerts query undocumented metrics: {missing:?}"
    );
    for alert in [
        "ShopServiceDown",
        "ShopRelayLagHigh",
        "ShopConsumerLagHigh",
        "ShopDeadLetters",
        "ShopGrpcErrorRateHigh",
        "ShopCircuitBreakerOpen",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "{alert}");
    }
    Ok(())
}
