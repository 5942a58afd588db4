//! The README's run command, as a user runs it: `shopctl up` with no
//! configuration starts private Postgres and nats-server plus the three
//! services; `shopctl demo` tells its story against it; SIGTERM stops it all.

use std::{
    io::Read as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn shopctl() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_shopctl"));
    command.env_remove("NATS_URL").env_remove("DATABASE_URL");
    command
}

#[test]
fn up_then_demo_then_sigterm_stops_everything() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
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
    Ok(())
}
