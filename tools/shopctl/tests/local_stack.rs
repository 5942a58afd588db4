//! The README's run command, as a user runs it: `shopctl up` with no
//! configuration starts private Postgres and nats-server plus the three
//! services; `shopctl demo` tells its story against it; SIGTERM stops it all.

use std::{
    io::Read as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use std::os::unix::fs::PermissionsExt as _;

fn shopctl() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shopctl"));
    for name in [
        "SHOP_NATS_URL",
        "SHOP_POSTGRES_URL",
        "SHOP_DATABASE_URL",
        "RUST_BACKTRACE",
    ] {
        command.env_remove(name);
    }
    command
}

#[test]
fn up_then_demo_then_sigterm_stops_everything() -> Result<(), Box<dyn std::error::Error>> {
    // A 0700 directory owned by root, like a home directory or `mktemp -d`:
    // the postgres user cannot enter it, and the quick start must still work.
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    let data = dir.path().join("data");
    let mut up = shopctl()
        .args(["up", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stack_file = data.join("stack.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stack_file.exists() {
        assert!(up.try_wait()?.is_none(), "shopctl up exited early");
        assert!(Instant::now() < deadline, "the stack did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }

    let demo = shopctl()
        .args(["demo", "--stack-file"])
        .arg(&stack_file)
        .output()?;
    let story = String::from_utf8(demo.stdout)?;
    assert!(
        demo.status.success(),
        "demo failed:\n{story}\n{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    assert!(story.contains("3. Placed order"), "{story}");
    assert!(
        story.contains("5. Notification via log: \"Order"),
        "{story}"
    );
    assert!(story.contains("Order to notification:"), "{story}");
    assert!(
        story.contains("7. Audit trail: v1 order.created, v2 order.paid, v3 order.shipped"),
        "{story}"
    );

    // The operator commands work against the same stack.
    let order_id = story
        .split("shopctl orders history ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the demo names its order")
        .to_owned();
    let run = |args: &[&str]| -> Result<String, Box<dyn std::error::Error>> {
        let output = shopctl()
            .args(args)
            .arg("--stack-file")
            .arg(&stack_file)
            .output()?;
        let text = String::from_utf8(output.stdout)?;
        assert!(
            output.status.success(),
            "{args:?} failed:\n{text}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(text)
    };
    let history = run(&["orders", "history", &order_id])?;
    assert!(history.contains("3 events"), "{history}");
    assert!(history.contains("status: created -> paid"), "{history}");
    let at = run(&["orders", "at", &order_id, "--version", "1"])?;
    assert!(at.contains("\"status\": \"created\""), "{at}");

    // Scriptable: --json parses, with the fields a script needs.
    let history: serde_json::Value =
        serde_json::from_str(&run(&["orders", "history", &order_id, "--json"])?)?;
    let types: Vec<_> = history
        .as_array()
        .expect("an array")
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(types, ["order.created", "order.paid", "order.shipped"]);
    assert!(
        history[1]["changes"]
            .as_array()
            .is_some_and(|c| c.contains(&serde_json::json!(
                {"field": "status", "before": "created", "after": "paid"}
            ))),
        "{history}"
    );
    let at: serde_json::Value = serde_json::from_str(&run(&[
        "orders",
        "at",
        &order_id,
        "--version",
        "2",
        "--json",
    ])?)?;
    assert_eq!(at["version"], 2, "{at}");
    assert_eq!(at["state"]["status"], "paid", "{at}");
    assert_eq!(at["events"].as_array().map(Vec::len), Some(2), "{at}");
    let projections: serde_json::Value =
        serde_json::from_str(&run(&["projections", "status", "--json"])?)?;
    assert_eq!(projections[0]["name"], "order_summary", "{projections}");
    assert!(
        projections[0]["live"]["position"].as_i64() >= Some(1),
        "{projections}"
    );
    let letters: serde_json::Value = serde_json::from_str(&run(&["dlq", "list", "--json"])?)?;
    assert_eq!(
        letters,
        serde_json::json!([]),
        "no dead letters after the demo"
    );
    let status: serde_json::Value = serde_json::from_str(&run(&["status", "--json"])?)?;
    let services = status["services"].as_array().expect("services");
    assert_eq!(services.len(), 3, "{status}");
    for service in services {
        assert_eq!(service["health"]["ready"], true, "{status}");
    }
    assert_eq!(
        services[1]["breakers"]["user-service"], "closed",
        "{status}"
    );
    assert_eq!(
        status["processes"].as_array().map(Vec::len),
        Some(5),
        "{status}"
    );
    // Prometheus file-based discovery of the admin ports.
    let targets: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        data.join("prometheus-targets.json"),
    )?)?;
    let services: Vec<_> = targets
        .as_array()
        .expect("target groups")
        .iter()
        .map(|g| {
            g["labels"]["service"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        services,
        ["user-service", "order-service", "notification-service"]
    );
    let text = run(&["status"])?;
    assert!(
        text.contains("circuit breaker to user-service: closed"),
        "{text}"
    );

    // Errors a person can act on: printed once, naming what is wrong.
    let beyond = shopctl()
        .args(["orders", "at", &order_id, "--version", "99", "--stack-file"])
        .arg(&stack_file)
        .output()?;
    let stderr = String::from_utf8(beyond.stderr)?;
    assert!(
        !beyond.status.success(),
        "version 99 of a 3-version order is an error"
    );
    assert_eq!(
        stderr.trim(),
        format!("shopctl: order {order_id} has 3 versions; there is no version 99")
    );
    let unreachable = shopctl()
        .args(["orders", "history", &order_id, "--database-url"])
        .arg("postgres://postgres@127.0.0.1:1/shop_orders")
        .output()?;
    let stderr = String::from_utf8(unreachable.stderr)?;
    assert!(!unreachable.status.success());
    assert!(
        stderr.starts_with("shopctl: cannot connect to Postgres at 127.0.0.1:1/shop_orders: "),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "printed once: {stderr}");

    // `| head`: a closed pipe ends the output, never in a panic.
    let mut piped = shopctl()
        .args(["orders", "history", &order_id, "--stack-file"])
        .arg(&stack_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(piped.stdout.take());
    let closed = piped.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(closed.status.code().is_some(), "not killed by a signal");

    let completions = shopctl().args(["completions", "bash"]).output()?;
    let script = String::from_utf8(completions.stdout)?;
    assert!(
        completions.status.success() && script.contains("_shopctl()"),
        "{script}"
    );
    let rebuilt = run(&["projections", "rebuild", "order_summary"])?;
    assert!(
        rebuilt.contains("Generation 2 of order_summary is live"),
        "{rebuilt}"
    );
    let republished = run(&["relay", "republish", "--from", "1"])?;
    assert!(
        republished.contains("Republished 3 events"),
        "{republished}"
    );

    // The load generator, briefly: every command accepted, every
    // notification streamed back, the three report files written.
    let reports = dir.path().join("load-report");
    let load = run(&[
        "load",
        "--concurrency",
        "2",
        "--duration",
        "2s",
        "--warmup",
        "0s",
        "--json",
        "--quiet",
        "--report-dir",
        reports.to_str().unwrap_or_default(),
    ])?;
    let load: serde_json::Value = serde_json::from_str(&load)?;
    assert!(load["commands_ok"].as_u64() > Some(0), "{load}");
    assert_eq!(load["errors"], 0, "{load}");
    assert_eq!(load["notifications_missing"], 0, "{load}");
    assert!(
        load["notification_e2e"]["count"].as_u64() > Some(0),
        "{load}"
    );
    assert!(std::fs::read_to_string(reports.join("load.svg"))?.starts_with("<svg"));
    assert!(std::fs::read_to_string(reports.join("load.md"))?.contains("| create |"));
    serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(
        reports.join("load.json"),
    )?)?;

    let pid = up.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = up.try_wait()? {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "shopctl up did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut output = String::new();
    up.stdout.take().map(|mut s| s.read_to_string(&mut output));
    assert!(
        status.success(),
        "shopctl up exited with {status}:\n{output}"
    );
    assert!(output.contains("The shop is up:"), "{output}");
    assert!(output.contains("Stopped."), "{output}");
    assert!(!stack_file.exists(), "the stack file is removed on exit");
    assert!(
        !data.join("postgres/postmaster.pid").exists(),
        "postgres shut down cleanly (its pid file is gone)"
    );
    remove_fallback_cluster(&data);
    Ok(())
}

/// A `shopctl up` running in the background on its own data dir.
struct Up {
    child: std::process::Child,
    data: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Up {
    fn start() -> Result<Self, Box<dyn std::error::Error>> {
        Self::start_with(&[])
    }

    /// `shopctl up` with `flags` besides its data dir.
    fn start_with(flags: &[&str]) -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        // Its output, for the failure message if it stops early.
        let log = std::fs::File::create(dir.path().join("up.log"))?;
        let child = shopctl()
            .args(["up", "--data-dir"])
            .arg(&data)
            .args(flags)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut up = Self {
            child,
            data,
            _dir: dir,
        };
        up.wait_until_up()?;
        Ok(up)
    }

    fn wait_until_up(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.stack_file().exists() {
            if self.child.try_wait()?.is_some() {
                let log = self.data.with_file_name("up.log");
                panic!(
                    "shopctl up exited early:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the stack did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn stack_file(&self) -> std::path::PathBuf {
        self.data.join("stack.json")
    }

    fn stack(&self) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            self.stack_file(),
        )?)?)
    }

    /// Pids of everything the supervisor started.
    fn pids(&self) -> Result<Vec<(String, u32)>, Box<dyn std::error::Error>> {
        Ok(self.stack()?["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_owned(),
                    p["pid"].as_u64().unwrap_or_default() as u32,
                )
            })
            .collect())
    }

    /// `status --json`, and whether it exited 0 (the stack is healthy).
    fn status_json(&self) -> Result<(serde_json::Value, bool), Box<dyn std::error::Error>> {
        let output = shopctl()
            .args(["status", "--json", "--stack-file"])
            .arg(self.stack_file())
            .output()?;
        let report = serde_json::from_slice(&output.stdout)
            .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&output.stderr)))?;
        Ok((report, output.status.success()))
    }

    fn signal(&self, signal: &str) {
        signal_pid(self.child.id(), signal);
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Ok(pids) = self.pids() {
            for (_, pid) in pids {
                signal_pid(pid, "CONT");
            }
        }
        self.signal("TERM");
        let _ = self.child.wait();
        remove_fallback_cluster(&self.data);
    }
}

/// As root from a 0700 directory the cluster lives under /var/lib/shopctl
/// (`<data>/postgres` links there): remove it with the test's directory.
fn remove_fallback_cluster(data: &std::path::Path) {
    if let Ok(target) = std::fs::read_link(data.join("postgres")) {
        let _ = std::fs::remove_dir_all(target);
    }
}

fn signal_pid(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status();
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .starts_with(" Z")
    })
}

fn assert_all_gone(pids: &[(String, u32)], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<_> = pids.iter().filter(|(_, pid)| alive(*pid)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still running {within:?} after the supervisor died: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_second_up_refuses_and_sigkill_of_up_leaves_nothing_running()
-> Result<(), Box<dyn std::error::Error>> {
    let mut up = Up::start()?;
    let pids = up.pids()?;
    assert_eq!(pids.len(), 5, "nats, postgres and three services: {pids:?}");
    let log_before = std::fs::metadata(up.data.join("postgres.log"))?.len();

    let second = shopctl()
        .args(["up", "--data-dir"])
        .arg(&up.data)
        .output()?;
    let stderr = String::from_utf8(second.stderr)?;
    assert!(
        !second.status.success(),
        "a second up on the same data dir must refuse"
    );
    assert!(
        stderr.contains(&format!(
            "another `shopctl up` (pid {}) is running",
            up.child.id()
        )),
        "{stderr}"
    );
    assert!(
        up.stack_file().exists(),
        "the running stack's file is untouched"
    );
    assert!(
        std::fs::metadata(up.data.join("postgres.log"))?.len() >= log_before,
        "postgres.log is not truncated"
    );
    let (status, healthy) = up.status_json()?;
    assert!(healthy, "{status}");
    for service in status["services"].as_array().expect("services") {
        assert_eq!(service["health"]["ready"], true, "{status}");
    }

    up.signal("KILL");
    let _ = up.child.wait();
    assert_all_gone(&pids, Duration::from_secs(30));

    // The next up on the same dir starts (the lock died with its holder).
    let child = shopctl()
        .args(["up", "--data-dir"])
        .arg(&up.data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    up.child = child;
    let _ = std::fs::remove_file(up.stack_file());
    up.wait_until_up()?;
    let (status, healthy) = up.status_json()?;
    assert!(healthy, "{status}");
    assert_eq!(status["services"][1]["health"]["ready"], true, "{status}");
    Ok(())
}

#[test]
fn status_shows_a_backlog_and_an_open_breaker_and_sighup_stops_everything()
-> Result<(), Box<dyn std::error::Error>> {
    use contracts::{
        order::v1::{
            CreateOrderRequest, GetOrderRequest, OrderItem, ShippingAddress,
            order_service_client::OrderServiceClient,
        },
        user::v1::{
            AuthenticateRequest, CreateUserRequest, user_service_client::UserServiceClient,
        },
    };

    let up = Up::start()?;
    let pids = up.pids()?;
    let pid_of = |name: &str| pids.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
    let stack = up.stack()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut users = UserServiceClient::connect(
            stack["user_service"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
        .await?;
        let mut orders = OrderServiceClient::connect(
            stack["order_service"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
        .await?;
        let email = format!("st-{}@example.com", uuid::Uuid::new_v4().simple());
        let password = "long enough pw".to_owned();
        users
            .create_user(CreateUserRequest {
                email: email.clone(),
                password: password.clone(),
            })
            .await?;
        let token = users
            .authenticate(AuthenticateRequest { email, password })
            .await?
            .into_inner()
            .access_token;

        // A backlog: NATS frozen, so the relay cannot publish what commits.
        signal_pid(pid_of("nats-server").expect("nats"), "STOP");
        orders
            .create_order(testkit::bearer(
                &token,
                CreateOrderRequest {
                    items: vec![OrderItem {
                        sku: "SKU-1".to_owned(),
                        quantity: 1,
                        unit_price_minor: 100,
                    }],
                    currency: "EUR".to_owned(),
                    idempotency_key: uuid::Uuid::new_v4().to_string(),
                    shipping_address: Some(ShippingAddress {
                        name: "A".to_owned(),
                        line1: "B".to_owned(),
                        line2: String::new(),
                        city: "C".to_owned(),
                        postal_code: "D".to_owned(),
                        country: "GB".to_owned(),
                    }),
                },
            ))
            .await?;

        // An open breaker: user-service frozen, tokens it must check time out.
        signal_pid(pid_of("user-service").expect("user-service"), "STOP");
        let calls = (0..8).map(|_| {
            let mut orders = orders.clone();
            async move {
                orders
                    .get_order(testkit::bearer(
                        &format!("unknown-{}", uuid::Uuid::new_v4()),
                        GetOrderRequest {
                            order_id: uuid::Uuid::new_v4().to_string(),
                            min_position: 0,
                        },
                    ))
                    .await
            }
        });
        let results = futures::future::join_all(calls).await;
        assert!(results.iter().all(Result::is_err), "{results:?}");
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, healthy) = up.status_json()?;
        let order_service = &status["services"][1];
        if order_service["breakers"]["user-service"] == "open"
            && order_service["relay_lag_events"]["order-events"].as_f64() >= Some(1.0)
        {
            assert_eq!(
                order_service["health"]["ready"], true,
                "degraded, not unready: {status}"
            );
            assert!(
                order_service["health"]["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("degraded")),
                "{status}"
            );
            assert!(
                !healthy,
                "an open breaker degrades order-service (still ready, ADR 13): exit non-zero"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed them: {status}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let text = shopctl()
        .args(["status", "--stack-file"])
        .arg(up.stack_file())
        .output()?;
    let text = String::from_utf8(text.stdout)?;
    assert!(
        text.contains("circuit breaker to user-service: open"),
        "{text}"
    );
    assert!(text.contains("relay lag order-events: "), "{text}");

    for (_, pid) in &pids {
        signal_pid(*pid, "CONT");
    }
    // The terminal closes: SIGHUP stops the whole stack cleanly.
    up.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut up = up;
    let exit = loop {
        if let Some(status) = up.child.try_wait()? {
            break status;
        }
        assert!(Instant::now() < deadline, "shopctl up ignored SIGHUP");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit}");
    assert_all_gone(&pids, Duration::from_secs(10));
    Ok(())
}

#[test]
fn a_scaled_out_stack_runs_the_demo_and_a_load_and_status_shows_every_process_and_its_leaders()
-> Result<(), Box<dyn std::error::Error>> {
    let up = Up::start_with(&["--replicas", "2", "--nats-cluster", "3"])?;
    let stack = up.stack()?;
    let instances: Vec<&str> = stack["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(
        instances,
        [
            "user-service-1",
            "user-service-2",
            "order-service-1",
            "order-service-2",
            "notification-service-1",
            "notification-service-2"
        ],
        "{stack:#}"
    );
    let names: Vec<String> = up.pids()?.into_iter().map(|(name, _)| name).collect();
    for node in ["nats-0", "nats-1", "nats-2"] {
        assert!(names.iter().any(|n| n == node), "{node} in {names:?}");
    }
    assert_eq!(
        stack["nats_url"].as_str().map(|u| u.split(',').count()),
        Some(3),
        "every node's URL: {stack:#}"
    );

    let demo = shopctl()
        .args(["demo", "--stack-file"])
        .arg(up.stack_file())
        .output()?;
    let story = String::from_utf8_lossy(&demo.stdout);
    assert!(demo.status.success(), "demo failed:\n{story}");
    assert!(story.contains("5. Notification via log"), "{story}");

    let load = shopctl()
        .args([
            "load",
            "--concurrency",
            "4",
            "--duration",
            "4s",
            "--warmup",
            "1s",
        ])
        .args(["--json", "--quiet", "--stack-file"])
        .arg(up.stack_file())
        .output()?;
    let report: serde_json::Value = serde_json::from_slice(&load.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&load.stderr)))?;
    assert!(load.status.success(), "{report:#}");
    assert!(report["commands_ok"].as_u64() > Some(0), "{report:#}");
    assert_eq!(report["errors"], 0, "{report:#}");
    assert_eq!(report["notifications_missing"], 0, "{report:#}");

    // Every replica answers; each follower is led by exactly one of them.
    let (status, healthy) = up.status_json()?;
    assert!(healthy, "{status:#}");
    let services = status["services"].as_array().expect("services");
    assert_eq!(services.len(), 6, "{status:#}");
    let mut leaders = std::collections::BTreeMap::new();
    for service in services {
        for follower in service["leads"].as_array().into_iter().flatten() {
            *leaders
                .entry(follower.as_str().unwrap_or_default().to_owned())
                .or_insert(0) += 1;
        }
    }
    for follower in [
        "outbox:user-events",
        "outbox:order-events",
        "projection:order_summary@1",
        "projection:orders_by_user@1",
    ] {
        assert_eq!(leaders.get(follower), Some(&1), "{follower}: {status:#}");
    }
    Ok(())
}
