//! Sign-in abuse against the real user-service (issue 12, finding 4; ADR
//! 0012): guessing backs the guesser off without locking the owner out,
//! spraying is slowed per address, a distributed attack on one account spares
//! its owner's known address, forged `x-forwarded-for` evades nothing, and
//! random emails leave bounded state.

use std::time::Duration;

use contracts::user::v1::{AuthenticateRequest, CreateUserRequest};
use testkit::TestStack;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;
use uuid::Uuid;

use crate::helpers::assert_rejected;

/// An Authenticate request that a trusted proxy forwarded for `client`.
fn sign_in(email: &str, password: &str, client: &str) -> tonic::Request<AuthenticateRequest> {
    let mut request = tonic::Request::new(AuthenticateRequest {
        email: email.to_owned(),
        password: password.to_owned(),
    });
    request
        .metadata_mut()
        .insert("x-forwarded-for", client.parse().expect("ascii"));
    request
}

fn retry_after(status: &Status) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("retry in"),
        "{}",
        status.message()
    );
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo with a delay")
}

async fn create(stack: &TestStack, email: &str, password: &str) -> anyhow::Result<()> {
    stack
        .users()
        .await?
        .create_user(CreateUserRequest {
            email: email.to_owned(),
            password: password.to_owned(),
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn guessing_backs_the_guesser_off_and_never_locks_the_owner_out() -> anyhow::Result<()> {
    let stack = TestStack::start_with(|auth| {
        auth.throttle.trusted_proxies = "127.0.0.0/8".to_owned();
        auth.throttle.per_account_address = 3;
        auth.throttle.base_delay_ms = 400;
    })
    .await?;
    create(&stack, "owner@example.com", "right password").await?;
    let mut users = stack.users().await?;
    let attacker = "198.51.100.1";
    for _ in 0..3 {
        assert_rejected(
            users
                .authenticate(sign_in("owner@example.com", "guess", attacker))
                .await,
            Code::Unauthenticated,
            None,
        );
    }
    let first = users
        .authenticate(sign_in("owner@example.com", "right password", attacker))
        .await
        .expect_err("the guesser waits, even with the right password");
    let first = retry_after(&first);
    assert!(first <= Duration::from_millis(400), "{first:?}");
    // The owner, elsewhere, is not locked out (today's code locked the email).
    users
        .authenticate(sign_in(
            "owner@example.com",
            "right password",
            "203.0.113.7",
        ))
        .await?;
    // Backoff, not a lock: after the wait one more guess, then twice as long.
    tokio::time::sleep(first + Duration::from_millis(50)).await;
    assert_rejected(
        users
            .authenticate(sign_in("owner@example.com", "guess", attacker))
            .await,
        Code::Unauthenticated,
        None,
    );
    let second = users
        .authenticate(sign_in("owner@example.com", "guess", attacker))
        .await
        .expect_err("backing off");
    let second = retry_after(&second);
    assert!(
        second > Duration::from_millis(500) && second <= Duration::from_millis(800),
        "the wait doubles: {second:?}"
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn password_spraying_from_one_address_is_slowed_across_accounts() -> anyhow::Result<()> {
    let stack = TestStack::start_with(|auth| {
        auth.throttle.trusted_proxies = "127.0.0.0/8".to_owned();
        auth.throttle.per_address = 4;
        auth.throttle.base_delay_ms = 60_000;
    })
    .await?;
    let mut users = stack.users().await?;
    let sprayer = "198.51.100.2";
    for i in 0..4 {
        assert_rejected(
            users
                .authenticate(sign_in(
                    &format!("victim{i}@example.com"),
                    "Summer2026!",
                    sprayer,
                ))
                .await,
            Code::Unauthenticated,
            None,
        );
    }
    let held = users
        .authenticate(sign_in("victim9@example.com", "Summer2026!", sprayer))
        .await
        .expect_err("a fresh account does not reset the sprayer");
    assert!(retry_after(&held) > Duration::from_secs(50));
    // The same accounts from another address are not held back.
    assert_rejected(
        users
            .authenticate(sign_in("victim9@example.com", "Summer2026!", "203.0.113.8"))
            .await,
        Code::Unauthenticated,
        None,
    );
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_distributed_attack_holds_back_new_addresses_but_not_the_owners_known_one()
-> anyhow::Result<()> {
    let stack = TestStack::start_with(|auth| {
        auth.throttle.trusted_proxies = "127.0.0.0/8".to_owned();
        auth.throttle.per_account = 5;
        auth.throttle.base_delay_ms = 60_000;
    })
    .await?;
    create(&stack, "target@example.com", "right password").await?;
    let mut users = stack.users().await?;
    let home = "203.0.113.9";
    users
        .authenticate(sign_in("target@example.com", "right password", home))
        .await?;
    for i in 10..15 {
        assert_rejected(
            users
                .authenticate(sign_in(
                    "target@example.com",
                    "guess",
                    &format!("198.51.100.{i}"),
                ))
                .await,
            Code::Unauthenticated,
            None,
        );
    }
    let held = users
        .authenticate(sign_in("target@example.com", "guess", "198.51.100.20"))
        .await
        .expect_err("a new address waits once the account is under attack");
    retry_after(&held);
    users
        .authenticate(sign_in("target@example.com", "right password", home))
        .await
        .map_err(|e| anyhow::anyhow!("the owner's known address still signs in: {e:?}"))?;
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_forged_forwarded_for_header_does_not_evade_throttling() -> anyhow::Result<()> {
    // No trusted proxies: the header is the caller's word and is ignored.
    let stack = TestStack::start_with(|auth| {
        auth.throttle.per_address = 3;
        auth.throttle.base_delay_ms = 60_000;
    })
    .await?;
    let mut users = stack.users().await?;
    for i in 0..3 {
        assert_rejected(
            users
                .authenticate(sign_in(
                    &format!("spray{i}@example.com"),
                    "guess",
                    &format!("198.51.100.{i}"),
                ))
                .await,
            Code::Unauthenticated,
            None,
        );
    }
    let held = users
        .authenticate(sign_in("spray9@example.com", "guess", "198.51.100.99"))
        .await
        .expect_err("still the same peer");
    retry_after(&held);
    stack.stop().await;
    Ok(())
}

#[tokio::test]
async fn random_emails_from_random_addresses_leave_bounded_state() -> anyhow::Result<()> {
    const BUCKETS: i64 = 4;
    let stack = TestStack::start_with(|auth| {
        auth.throttle.trusted_proxies = "127.0.0.0/8".to_owned();
        auth.throttle.buckets = 4;
        auth.throttle.per_account_address = 1000;
        auth.throttle.per_address = 1000;
        auth.throttle.per_account = 1000;
    })
    .await?;
    let users = stack.users().await?;
    let attempts = (0..60).map(|i| {
        let mut users = users.clone();
        async move {
            let email = format!("{}@example.com", Uuid::new_v4());
            users
                .authenticate(sign_in(
                    &email,
                    "guess",
                    &format!("198.51.{}.{}", i / 250, i % 250),
                ))
                .await
        }
    });
    for outcome in futures::future::join_all(attempts).await {
        let code = outcome.expect_err("nobody signs in").code();
        assert!(
            matches!(code, Code::Unauthenticated | Code::ResourceExhausted),
            "{code:?}"
        );
    }
    let pool = sqlx::PgPool::connect(&stack.user_db.url).await?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sign_in_throttle")
        .fetch_one(&pool)
        .await?;
    assert!(
        (1..=3 * BUCKETS).contains(&rows),
        "{rows} rows for 60 random emails: bounded by 3 scopes × {BUCKETS} buckets"
    );
    pool.close().await;
    stack.stop().await;
    Ok(())
}

/// Concurrent sign-ins for unknown emails (each a full argon2 verification)
/// are bounded: beyond the hashing pool's queue callers get
/// RESOURCE_EXHAUSTED at once, and a legitimate sign-in right after works.
#[tokio::test]
async fn a_flood_of_concurrent_sign_ins_is_refused_fast_and_the_owner_still_signs_in()
-> anyhow::Result<()> {
    let stack = TestStack::start_with(|auth| {
        auth.throttle.trusted_proxies = "127.0.0.0/8".to_owned();
    })
    .await?;
    create(&stack, "calm@example.com", "right password").await?;
    let users = stack.users().await?;
    let flood = (0..120).map(|i| {
        let mut users = users.clone();
        async move {
            let started = std::time::Instant::now();
            let outcome = users
                .authenticate(sign_in(
                    &format!("flood{i}@example.com"),
                    "guess",
                    &format!("198.51.100.{}", i % 200),
                ))
                .await;
            (outcome.map(|_| ()).map_err(|e| e.code()), started.elapsed())
        }
    });
    let outcomes = futures::future::join_all(flood).await;
    let busy: Vec<Duration> = outcomes
        .iter()
        .filter(|(code, _)| *code == Err(Code::ResourceExhausted))
        .map(|(_, took)| *took)
        .collect();
    assert!(
        !busy.is_empty(),
        "120 concurrent hashes on a pool of one thread per core and 8 waiting per thread"
    );
    let mut hashed: Vec<Duration> = outcomes
        .iter()
        .filter(|(code, _)| *code == Err(Code::Unauthenticated))
        .map(|(_, took)| *took)
        .collect();
    let mut busy = busy;
    busy.sort();
    hashed.sort();
    if let (Some(busy), Some(hashed)) = (busy.get(busy.len() / 2), hashed.get(hashed.len() / 2)) {
        assert!(
            busy < hashed,
            "refusals are fast: median {busy:?} vs {hashed:?} for a verification"
        );
    }
    assert!(
        outcomes
            .iter()
            .all(|(code, _)| matches!(code, Err(Code::Unauthenticated | Code::ResourceExhausted))),
        "{outcomes:?}"
    );
    stack
        .users()
        .await?
        .authenticate(sign_in("calm@example.com", "right password", "203.0.113.1"))
        .await?;
    stack.stop().await;
    Ok(())
}

/// Concurrent guesses all passed the check before the first failure was
/// recorded (check and record are two statements with a hash between
/// them): a backoff window allowed as many guesses as the hashing queue
/// holds. Now one sign-in per email and address is checked at a time.
#[tokio::test]
async fn concurrent_guesses_are_checked_one_at_a_time() -> anyhow::Result<()> {
    let stack = TestStack::start_with(|auth| {
        auth.throttle.trusted_proxies = "127.0.0.0/8".to_owned();
        auth.throttle.per_account_address = 2;
        auth.throttle.base_delay_ms = 60_000;
    })
    .await?;
    create(&stack, "burst@example.com", "right password").await?;
    let users = stack.users().await?;
    let guesses = (0..16).map(|i| {
        let mut users = users.clone();
        async move {
            users
                .authenticate(sign_in(
                    "burst@example.com",
                    &format!("guess {i}"),
                    "198.51.100.50",
                ))
                .await
        }
    });
    let outcomes = futures::future::join_all(guesses).await;
    let evaluated = outcomes
        .iter()
        .filter(|o| matches!(o, Err(s) if s.code() == Code::Unauthenticated))
        .count();
    assert!(
        (1..=2).contains(&evaluated),
        "{evaluated} of 16 concurrent guesses were checked against the password"
    );
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(s) if matches!(s.code(), Code::Unauthenticated | Code::ResourceExhausted))),
        "{outcomes:?}"
    );
    stack.stop().await;
    Ok(())
}
