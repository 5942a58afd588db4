//! `shopctl chaos` as CI runs it: a fast subset of the scenarios on real
//! processes (kill -9 of order-service and of nats-server, a poison
//! message), and the oracle's own test: a run sabotaged after it settled
//! must report exactly the one loss, duplicate, stranger and divergence
//! made by hand. `shopctl chaos all` is the full set (README).

use std::{process::Command, sync::Mutex};

use serde_json::Value;

/// One chaos run at a time: each starts its own Postgres, NATS and three
/// services, and two at once on two cores measure the machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn chaos(args: &[&str]) -> Result<(bool, Vec<Value>), Box<dyn std::error::Error>> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Under target/: the postgres user must be able to enter the directory.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let output = Command::new(env!("CARGO_BIN_EXE_shopctl"))
        .arg("chaos")
        .args(args)
        .args(["--json", "--data-dir"])
        .arg(dir.path())
        .env_remove("RUST_BACKTRACE")
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let outcomes: Vec<Value> = serde_json::from_str(&stdout).map_err(|e| {
        format!(
            "no JSON from shopctl chaos ({e}); stdout: {stdout}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((output.status.success(), outcomes))
}

fn count(outcome: &Value, key: &str) -> u64 {
    outcome[key].as_u64().unwrap_or(u64::MAX)
}

/// `scenarios` outcomes, each passed with nothing lost, duplicated,
/// unexpected or diverged, and at least `acknowledged` commands.
fn assert_clean(outcomes: &[Value], scenarios: usize, acknowledged: u64) {
    assert_eq!(outcomes.len(), scenarios, "{outcomes:#?}");
    for outcome in outcomes {
        let name = &outcome["scenario"];
        for key in ["lost", "duplicated", "unexpected", "diverged"] {
            assert_eq!(count(outcome, key), 0, "{name}: {key}; {outcome:#}");
        }
        assert!(
            count(outcome, "acknowledged") >= acknowledged,
            "{name}: too little load to mean anything; {outcome:#}"
        );
        assert_eq!(outcome["passed"], true, "{name}: {outcome:#}");
    }
}

#[test]
fn the_ci_subset_of_scenarios_loses_duplicates_invents_and_diverges_nothing()
-> Result<(), Box<dyn std::error::Error>> {
    let (success, outcomes) = chaos(&[
        "kill-order,kill-nats,poison",
        "--duration",
        "12s",
        "--min-commands",
        "2000",
    ])?;
    assert_clean(&outcomes, 3, 2000);
    assert!(success, "every scenario passed, so the exit status is 0");
    Ok(())
}

#[test]
fn a_scaled_out_stack_loses_nothing_when_its_relay_leader_dies_or_is_cut_off_or_a_nats_node_dies()
-> Result<(), Box<dyn std::error::Error>> {
    // 2 replicas of each service on a 3-node NATS cluster with R3 streams.
    let (success, outcomes) = chaos(&[
        "kill-relay-leader,partition-relay-leader,kill-nats-node",
        "--duration",
        "12s",
        "--min-commands",
        "1000",
    ])?;
    // Their checks include the takeover and reconnect times within their bounds.
    assert_clean(&outcomes, 3, 1000);
    // Each timing was measured (and checked against its bound above).
    let figure = |scenario: &str, figure: &str| {
        outcomes
            .iter()
            .find(|o| o["scenario"] == scenario)
            .and_then(|o| o["figures"][figure].as_f64())
    };
    for (scenario, name) in [
        ("kill-relay-leader", "leader_takeover_s"),
        ("partition-relay-leader", "leader_takeover_s"),
        ("kill-nats-node", "nats_publishing_resumed_s"),
        ("kill-nats-node", "nats_consuming_resumed_s"),
    ] {
        assert!(
            figure(scenario, name).is_some(),
            "{scenario}: no {name}; {outcomes:#?}"
        );
    }
    assert!(success);
    Ok(())
}

#[test]
fn the_oracle_reports_exactly_the_defects_made_by_hand() -> Result<(), Box<dyn std::error::Error>> {
    let (success, outcomes) = chaos(&[
        "race",
        "--duration",
        "8s",
        "--min-commands",
        "0",
        "--sabotage",
    ])?;
    let [outcome] = outcomes.as_slice() else {
        panic!("one scenario, one outcome: {outcomes:?}");
    };
    // One message deleted from ORDERS, one notification doubled, one
    // message no store knows, one read-model row changed.
    for key in ["lost", "duplicated", "unexpected", "diverged"] {
        assert_eq!(count(outcome, key), 1, "{key}; {outcome:#}");
    }
    assert_eq!(outcome["passed"], false);
    assert!(!success, "a run with findings exits non-zero");
    Ok(())
}
