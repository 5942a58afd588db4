//! Throttling of failed sign-ins (ADR 0012): slow guessing down without
//! ever locking an owner out, in bounded state.
//!
//! Every failure counts in three scopes, each with its own allowance of
//! free failures; beyond it, the scope waits before its next try, doubling
//! from `base_delay` up to `max_delay` (backoff, never a hard lock):
//!
//! - **email from one address**: guessing one account from one place;
//! - **one address, any email**: password spraying from one place;
//! - **one email, any address**: a distributed attack on one account. This
//!   scope does not hold back an address that signed in to the account
//!   successfully within `known_address_days`, so its owner keeps working.
//!
//! A client address is the TCP peer or, behind a trusted proxy, the nearest
//! untrusted `x-forwarded-for` hop; IPv6 counts per /64. Scopes are stored
//! by a keyed hash in a fixed number of buckets per scope: the table never
//! holds more than `3 × buckets` rows whatever attackers send, a bucket
//! shared by two keys only throttles a little early, and without the key
//! nobody can aim at another user's bucket. Unknown emails are throttled
//! exactly like known ones, so throttling reveals nothing.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hmac::{KeyInit as _, Mac as _};
use platform::{
    db::StorageError,
    net::{Networks, canonical},
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// `APP_AUTH__THROTTLE__*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThrottleSettings {
    /// Failures of one email from one address before backoff starts: the
    /// next try waits `base_delay`, each later failure doubles the wait.
    pub per_account_address: u32,
    /// Failures from one address, over all emails, before backoff starts.
    pub per_address: u32,
    /// Failures of one email, over all addresses, before addresses that
    /// never signed in to it successfully back off.
    pub per_account: u32,
    /// The first wait; each further failure doubles it.
    pub base_delay_ms: u64,
    pub max_delay_secs: u64,
    /// A scope forgets its failures after this long without one (longer
    /// than `max_delay_secs`, so waiting out the backoff does not reset it).
    pub window_secs: u64,
    /// How long a successful sign-in makes its address known to the account.
    pub known_address_days: u64,
    /// Buckets per scope: the bound on stored state.
    pub buckets: u32,
    /// Comma-separated blocks of proxies whose `x-forwarded-for` is believed
    /// (e.g. the ingress controller's pod network); empty: none.
    pub trusted_proxies: String,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            per_account_address: 5,
            per_address: 30,
            per_account: 100,
            base_delay_ms: 1000,
            max_delay_secs: 900,
            window_secs: 3600,
            known_address_days: 30,
            buckets: 1 << 18,
            trusted_proxies: String::new(),
        }
    }
}

/// Where a sign-in comes from, as the throttle counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAddress(String);

impl ClientAddress {
    /// The client behind `peer`: the peer itself, or, when the peer is a
    /// trusted proxy, the nearest `x-forwarded-for` hop that is not one.
    #[must_use]
    pub fn resolve(
        peer: Option<SocketAddr>,
        forwarded_for: Option<&str>,
        trusted: &Networks,
    ) -> Self {
        let Some(mut client) = peer.map(|p| canonical(p.ip())) else {
            return Self("unknown".to_owned());
        };
        if let Some(hops) = forwarded_for {
            for hop in hops.rsplit(',') {
                if !trusted.contains(client) {
                    break;
                }
                // A hop a trusted proxy did not write is the client's word:
                // stay with the last address a trusted proxy vouched for.
                let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                    break;
                };
                client = canonical(ip);
            }
        }
        Self::of(client)
    }

    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(v4.to_string()),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Self(format!("{}/64", std::net::Ipv6Addr::from(prefix)))
            }
        }
    }
}

/// A sign-in that must wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    AccountAddress = 1,
    Address = 2,
    Account = 3,
}

/// The three buckets one attempt counts in, and the full keyed hash of its
/// (email, address): buckets are shared by design, "known address" must not
/// be (a colliding pair's success would exempt an attacker).
#[derive(Debug, Clone)]
pub struct Attempt {
    account_address: i64,
    address: i64,
    account: i64,
    tag: String,
}

/// Sign-in throttling in Postgres, shared by every replica.
#[derive(Clone)]
pub struct SignInThrottle {
    pool: PgPool,
    settings: ThrottleSettings,
    trusted: Networks,
    key: Vec<u8>,
    in_flight: InFlight,
}

/// Sign-ins being checked right now on this replica, per bucket. Checking
/// and recording a failure are two statements with a password hash between
/// them, so without this every concurrent guess would pass the check before
/// the first failure is recorded: one guess per backoff window would become
/// as many as the hashing queue holds.
#[derive(Clone, Debug, Default)]
struct InFlight(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, u32>>>);

/// Concurrent sign-ins per bucket and replica: one per email and address,
/// sixteen per address (an office behind one NAT), four per email (devices).
const IN_FLIGHT_LIMITS: [u32; 3] = [1, 16, 4];

/// One sign-in in flight; its buckets are released when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    in_flight: InFlight,
    buckets: [i64; 3],
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.in_flight.0.lock() {
            for bucket in self.buckets {
                if let Some(count) = map.get_mut(&bucket) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        map.remove(&bucket);
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for SignInThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignInThrottle")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SignInThrottle {
    /// `secret` keys the bucket hash (derived from the token signing key,
    /// so every replica agrees and outsiders cannot predict buckets).
    ///
    /// # Errors
    ///
    /// A malformed `trusted_proxies`.
    pub fn new(pool: PgPool, settings: ThrottleSettings, secret: &[u8]) -> Result<Self, String> {
        let trusted = Networks::parse(&settings.trusted_proxies)
            .map_err(|e| format!("APP_AUTH__THROTTLE__TRUSTED_PROXIES: {e}"))?;
        let mut key =
            HmacSha256::new_from_slice(b"shop sign-in throttle").map_err(|e| e.to_string())?;
        key.update(secret);
        Ok(Self {
            pool,
            trusted,
            key: key.finalize().into_bytes().to_vec(),
            settings,
            in_flight: InFlight::default(),
        })
    }

    /// Proxies whose `x-forwarded-for` is believed.
    #[must_use]
    pub fn trusted_proxies(&self) -> &Networks {
        &self.trusted
    }

    fn digest(&self, scope: Scope, parts: &[&str]) -> [u8; 32] {
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.key) else {
            return [0; 32];
        };
        mac.update(&[scope as u8]);
        for part in parts {
            mac.update(part.as_bytes());
            mac.update(&[0]);
        }
        mac.finalize().into_bytes().into()
    }

    fn bucket(&self, scope: Scope, parts: &[&str]) -> i64 {
        let digest = self.digest(scope, parts);
        let word = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        ((scope as i64) << 32) | i64::from(word % self.settings.buckets.max(1))
    }

    /// The buckets of `email` (normalized) signing in from `client`.
    #[must_use]
    pub fn attempt(&self, email: &str, client: &ClientAddress) -> Attempt {
        let tag = platform::hex::encode(&self.digest(Scope::AccountAddress, &[email, &client.0]));
        Attempt {
            account_address: self.bucket(Scope::AccountAddress, &[email, &client.0]),
            address: self.bucket(Scope::Address, &[&client.0]),
            account: self.bucket(Scope::Account, &[email]),
            tag,
        }
    }

    /// Takes `attempt`'s place among the sign-ins in flight on this replica,
    /// or `None` while too many for its email and address, address, or
    /// email are being checked already.
    #[must_use]
    pub fn enter(&self, attempt: &Attempt) -> Option<InFlightGuard> {
        let buckets = [attempt.account_address, attempt.address, attempt.account];
        let mut map = self.in_flight.0.lock().ok()?;
        if buckets
            .iter()
            .zip(IN_FLIGHT_LIMITS)
            .any(|(bucket, limit)| map.get(bucket).copied().unwrap_or(0) >= limit)
        {
            return None;
        }
        for bucket in buckets {
            *map.entry(bucket).or_insert(0) += 1;
        }
        Some(InFlightGuard {
            in_flight: self.in_flight.clone(),
            buckets,
        })
    }

    /// Whether `attempt` must wait, and how long.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn check(&self, attempt: &Attempt) -> Result<Option<Throttled>, StorageError> {
        let rows: Vec<(i64, f64, bool)> = sqlx::query_as(
            "SELECT bucket, \
                    GREATEST(EXTRACT(EPOCH FROM blocked_until - now()), 0)::float8, \
                    COALESCE(last_success > now() - $2 AND success_tag = $3, false) \
             FROM sign_in_throttle WHERE bucket = ANY($1)",
        )
        .bind([attempt.account_address, attempt.address, attempt.account])
        .bind(chrono_secs(
            self.settings.known_address_days.saturating_mul(86_400),
        ))
        .bind(&attempt.tag)
        .fetch_all(&self.pool)
        .await?;
        let known = rows
            .iter()
            .any(|(bucket, _, known)| *bucket == attempt.account_address && *known);
        let wait = rows
            .iter()
            .filter(|(bucket, _, _)| *bucket != attempt.account || !known)
            .map(|(_, wait, _)| *wait)
            .fold(0.0_f64, f64::max);
        Ok((wait > 0.0).then(|| Throttled {
            retry_after: Duration::from_secs_f64(wait.min(1e9)),
        }))
    }

    /// Counts a failure in all three scopes and starts or doubles the
    /// backoff of those past their allowance.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn record_failure(&self, attempt: &Attempt) -> Result<(), StorageError> {
        let s = &self.settings;
        let free = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        // The scope's count after this failure (a new window when the last
        // failure is older than the window).
        const COUNT: &str = "(CASE WHEN t.last_failure IS NULL OR t.last_failure < now() - $5 \
                              THEN 1 ELSE t.failures + 1 END)";
        let sql = format!(
            "INSERT INTO sign_in_throttle AS t (bucket, free_failures, failures, last_failure, blocked_until) \
             SELECT b, f, 1, now(), CASE WHEN f <= 1 THEN now() + $3 END \
             FROM UNNEST($1::bigint[], $2::int[]) AS u(b, f) \
             ON CONFLICT (bucket) DO UPDATE SET \
               free_failures = EXCLUDED.free_failures, \
               failures = {COUNT}, \
               last_failure = now(), \
               blocked_until = CASE WHEN {COUNT} >= EXCLUDED.free_failures \
                 THEN now() + LEAST($3 * power(2, LEAST({COUNT} - EXCLUDED.free_failures, 30)), $4) \
               END"
        );
        // Built from constants only.
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind([attempt.account_address, attempt.address, attempt.account])
            .bind([
                free(s.per_account_address),
                free(s.per_address),
                free(s.per_account),
            ])
            .bind(chrono::Duration::milliseconds(
                i64::try_from(s.base_delay_ms).unwrap_or(i64::MAX / 2_000_000),
            ))
            .bind(chrono_secs(s.max_delay_secs))
            .bind(chrono_secs(s.window_secs))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// After a successful sign-in: the email-from-this-address scope starts
    /// over and the address becomes known to the account. The other scopes
    /// keep counting (one good password must not reset a sprayer's count).
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn record_success(&self, attempt: &Attempt) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO sign_in_throttle (bucket, free_failures, failures, last_success, success_tag) \
             VALUES ($1, $2, 0, now(), $3) \
             ON CONFLICT (bucket) DO UPDATE SET failures = 0, blocked_until = NULL, \
               last_success = now(), success_tag = EXCLUDED.success_tag",
        )
        .bind(attempt.account_address)
        .bind(i32::try_from(self.settings.per_account_address).unwrap_or(i32::MAX))
        .bind(&attempt.tag)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes buckets with nothing left to remember.
    ///
    /// # Errors
    ///
    /// Fails when Postgres is unreachable.
    pub async fn prune(&self) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM sign_in_throttle \
             WHERE (last_failure IS NULL OR last_failure < now() - $1) \
               AND (blocked_until IS NULL OR blocked_until < now()) \
               AND (last_success IS NULL OR last_success < now() - $2)",
        )
        .bind(chrono_secs(self.settings.window_secs))
        .bind(chrono_secs(
            self.settings.known_address_days.saturating_mul(86_400),
        ))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Prunes every `every` until `shutdown`.
    pub async fn prune_until_stopped(
        self,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(error) = self.prune().await {
                        tracing::warn!(%error, "pruning sign-in throttle");
                    }
                }
            }
        }
    }
}

fn chrono_secs(secs: u64) -> chrono::Duration {
    chrono::Duration::seconds(
        i64::try_from(secs)
            .unwrap_or(i64::MAX / 1000)
            .min(i64::MAX / 1000),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("socket address"))
    }

    #[test]
    fn the_client_is_the_peer_unless_the_peer_is_a_trusted_proxy() {
        let none = Networks::default();
        let proxies = Networks::parse("10.0.0.0/8").expect("valid");
        let resolve = ClientAddress::resolve;
        assert_eq!(
            resolve(addr("203.0.113.9:4000"), Some("198.51.100.1"), &none).0,
            "203.0.113.9",
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            resolve(
                addr("10.1.1.1:4000"),
                Some("198.51.100.1, 10.2.2.2"),
                &proxies
            )
            .0,
            "198.51.100.1",
            "the nearest hop that is not a proxy"
        );
        assert_eq!(
            resolve(
                addr("10.1.1.1:4000"),
                Some("6.6.6.6, 198.51.100.1"),
                &proxies
            )
            .0,
            "198.51.100.1",
            "hops left of the first untrusted one are the client's word"
        );
        assert_eq!(
            resolve(addr("10.1.1.1:4000"), Some("garbage\n"), &proxies).0,
            "10.1.1.1",
            "an unparsable hop leaves the last trusted address"
        );
        assert_eq!(
            resolve(addr("[2001:db8:1:2:3:4:5:6]:4000"), None, &none).0,
            "2001:db8:1:2::/64",
            "IPv6 counts per /64"
        );
        assert_eq!(
            resolve(addr("[::ffff:198.51.100.7]:4000"), None, &none).0,
            "198.51.100.7"
        );
        assert_eq!(resolve(None, Some("1.2.3.4"), &proxies).0, "unknown");
    }

    proptest::proptest! {
        /// Untrusted `x-forwarded-for`: any header resolves to some address
        /// without panicking, and an untrusted peer's header changes nothing.
        #[test]
        fn any_forwarded_for_header_resolves(header in "\\PC{0,120}") {
            let proxies = Networks::parse("127.0.0.0/8").expect("valid");
            let _ = ClientAddress::resolve(addr("127.0.0.1:1"), Some(&header), &proxies);
            let untrusted = ClientAddress::resolve(addr("203.0.113.1:1"), Some(&header), &proxies);
            proptest::prop_assert_eq!(untrusted.0, "203.0.113.1");
        }
    }
}
