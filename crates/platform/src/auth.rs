//! Authenticating callers: every service validates bearer tokens by asking
//! user-service (`ValidateToken`) through the resilient client stack, and
//! caches answers briefly, never past a token's expiry.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use contracts::user::v1::{ValidateTokenRequest, user_service_client::UserServiceClient};
use tokio::time::Instant;
use tonic::{Code, Status, metadata::MetadataMap, transport::Channel};
use uuid::Uuid;

use crate::{
    StartError,
    client::{CallPolicy, ClientSettings},
    metrics::Metrics,
};

/// The caller, as user-service vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
    /// When the caller's token expires (what long-lived streams end at).
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Default user-service client settings.
#[must_use]
pub fn default_user_service() -> ClientSettings {
    ClientSettings::new("http://127.0.0.1:50051")
}

const CACHE_CAPACITY: usize = 10_000;

/// A client of user-service's `ValidateToken`.
#[derive(Debug, Clone)]
pub struct Authenticator {
    client: UserServiceClient<Channel>,
    policy: CallPolicy,
    cache_for: Duration,
    cache: Arc<Mutex<HashMap<String, (Caller, Instant)>>>,
}

impl Authenticator {
    /// Connects lazily: user-service may start after us. Validated tokens
    /// are trusted for `cache_for` (zero: always ask), never past expiry.
    ///
    /// # Errors
    ///
    /// Fails when the URL is not a valid URI.
    pub fn new(
        settings: &ClientSettings,
        cache_for: Duration,
        metrics: &Metrics,
    ) -> Result<Self, StartError> {
        // Several replicas: `http://a:1,http://b:2`, balanced.
        let mut endpoints = Vec::new();
        for url in crate::net::urls(&settings.url) {
            let mut endpoint = Channel::from_shared(url.to_owned())
                .map_err(|e| StartError::setting(format!("APP_USER_SERVICE__URL {url:?}"), e))?
                .connect_timeout(Duration::from_millis(settings.per_try_timeout_ms))
                .tcp_nodelay(true);
            if let Some(tls) = settings.tls.config(url, "APP_USER_SERVICE__TLS__")? {
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| StartError::setting("APP_USER_SERVICE__TLS__*", e))?;
            }
            endpoints.push(endpoint);
        }
        if endpoints.is_empty() {
            return Err(StartError::setting(
                "APP_USER_SERVICE__URL",
                "no address given",
            ));
        }
        let channel = crate::net::channel(endpoints);
        Ok(Self {
            client: UserServiceClient::new(channel),
            policy: CallPolicy::new("user-service", settings, metrics),
            cache_for,
            cache: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The breaker in front of user-service (for readiness).
    #[must_use]
    pub fn breaker(&self) -> &Arc<resilience::CircuitBreaker> {
        self.policy.breaker()
    }

    fn cached(&self, token: &str) -> Option<Caller> {
        let cache = self.cache.lock().ok()?;
        let (caller, until) = cache.get(token)?;
        (Instant::now() < *until).then_some(*caller)
    }

    fn remember(&self, token: &str, caller: Caller, expires_at: Option<&prost_types::Timestamp>) {
        if self.cache_for.is_zero() {
            return;
        }
        let now_unix = chrono::Utc::now().timestamp();
        let left = expires_at.map_or(0, |t| t.seconds - now_unix);
        let Ok(left) = u64::try_from(left) else {
            return;
        };
        let until = Instant::now() + self.cache_for.min(Duration::from_secs(left));
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_CAPACITY {
                let now = Instant::now();
                cache.retain(|_, (_, until)| *until > now);
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(token.to_owned(), (caller, until));
        }
    }

    /// Validates the `authorization: Bearer <token>` metadata, passing on
    /// what remains of the incoming request's deadline.
    ///
    /// # Errors
    ///
    /// UNAUTHENTICATED for a missing or rejected token, UNAVAILABLE when
    /// user-service cannot answer in time or its breaker is open.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        if let Some(caller) = self.cached(token) {
            return Ok(caller);
        }
        let deadline = crate::grpc::incoming_deadline(metadata);
        let correlation = metadata.get(crate::grpc::CORRELATION_ID).cloned();
        let traceparent = metadata.get("traceparent").cloned();
        let response = self
            .policy
            .call(deadline, true, |timeout| {
                let mut request = tonic::Request::new(ValidateTokenRequest {
                    access_token: token.to_owned(),
                });
                request.set_timeout(timeout);
                if let Some(value) = &correlation {
                    request
                        .metadata_mut()
                        .insert(crate::grpc::CORRELATION_ID, value.clone());
                }
                crate::trace::inject(request.metadata_mut());
                if !request.metadata().contains_key("traceparent")
                    && let Some(value) = &traceparent
                {
                    request.metadata_mut().insert("traceparent", value.clone());
                }
                let mut client = self.client.clone();
                async move { client.validate_token(request).await }
            })
            .await
            .map_err(|status| match status.code() {
                Code::Unauthenticated | Code::InvalidArgument => {
                    Status::unauthenticated("authorization: token is invalid or expired")
                }
                code => {
                    tracing::warn!(
                        ?code,
                        message = status.message(),
                        "user-service call failed"
                    );
                    Status::unavailable(format!(
                        "authentication is unavailable: {}",
                        status.message()
                    ))
                }
            })?
            .into_inner();
        let user_id = Uuid::parse_str(&response.user_id).map_err(|_| {
            tracing::error!("user-service returned a malformed user id");
            Status::unavailable("user-service gave an invalid answer; retry later")
        })?;
        let expires_at = response
            .expires_at
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0));
        let caller = Caller {
            user_id,
            expires_at,
        };
        self.remember(token, caller, response.expires_at.as_ref());
        Ok(caller)
    }
}

/// The token of `authorization: Bearer <token>`.
///
/// # Errors
///
/// UNAUTHENTICATED naming the header when it is missing or malformed.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let missing = || Status::unauthenticated("authorization: a `Bearer <token>` is required");
    let value = metadata
        .get("authorization")
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(missing)
}
