//! The `shop.user.v1.UserService` API: proto <-> domain at the edge, one
//! mapping from errors to `Status`.

use chrono::Utc;
use contracts::user::v1::{self as pb, user_service_server::UserService};
use es::EventContext;
use es_postgres::AppendError;
use platform::status::{self, FieldViolations};
use tonic::{Request, Response, Status};
use user_domain::{Email, Password};
use uuid::Uuid;

use crate::{
    auth::{self, TokenIssuer},
    hashing::HashPool,
    store::{StoreError, UserRecord, UserStore},
    throttle::{ClientAddress, SignInThrottle},
};

/// Handlers of `UserService`.
#[derive(Debug, Clone)]
pub struct UserApi {
    store: UserStore,
    tokens: TokenIssuer,
    throttle: SignInThrottle,
    hashes: HashPool,
    metrics: platform::metrics::Metrics,
}

impl UserApi {
    #[must_use]
    pub fn new(
        store: UserStore,
        tokens: TokenIssuer,
        throttle: SignInThrottle,
        hashes: HashPool,
        metrics: platform::metrics::Metrics,
    ) -> Self {
        Self {
            store,
            tokens,
            throttle,
            hashes,
            metrics,
        }
    }

    /// Runs a password hash or check on the bounded pool.
    async fn hashing<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        self.hashes
            .run(f)
            .await
            .map_err(|busy| Status::resource_exhausted(busy.to_string()))
    }
}

const BAD_CREDENTIALS: &str = "email or password is incorrect";
/// RFC 5321's limit on a forward path; longer input is not an address.
const MAX_EMAIL_LEN: usize = 320;
/// Longer than any password manager produces; bounds the hashing input.
const MAX_PASSWORD_LEN: usize = 1024;

/// RESOURCE_EXHAUSTED with the wait in the message and as `RetryInfo`.
fn too_many_failures(retry_after: std::time::Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    let secs = retry_after.as_secs_f64().ceil().max(1.0);
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("too many failed sign-ins; retry in {secs} s"),
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

/// RESOURCE_EXHAUSTED while another sign-in for the same email or address
/// is being checked on this replica.
fn busy_sign_in(retry_after: std::time::Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        "another sign-in for this email or address is in progress; retry in 1 s",
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

fn to_proto(user: &UserRecord) -> pb::User {
    pb::User {
        id: user.id.to_string(),
        email: user.email.clone(),
        created_at: Some(contracts::timestamp(user.created_at)),
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let correlation_id = platform::grpc::correlation_id(request.metadata());
        let traceparent = platform::trace::current_traceparent()
            .or_else(|| platform::grpc::traceparent(request.metadata()));
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let email = violations.check("email", Email::parse(&request.email));
        let password = violations.check("password", Password::parse(&request.password));
        let (Some(email), Some(password)) = (email, password) else {
            return Err(violations.into_status());
        };
        let hash = self
            .hashing(move || auth::hash_password(password.expose()))
            .await?
            .map_err(|e| status::internal(&e))?;
        let id = Uuid::now_v7();
        let context = EventContext {
            correlation_id,
            causation_id: correlation_id,
            actor: id.to_string(),
            traceparent,
        };
        let user = self.store.create(id, &email, &hash, &context).await?;
        self.metrics.events_appended("user.created", 1);
        tracing::info!(user_id = %user.id, "user created");
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(to_proto(&user)),
        }))
    }

    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn authenticate(
        &self,
        request: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let client = ClientAddress::resolve(
            request.remote_addr(),
            // Every x-forwarded-for header, in order, as one list: a proxy
            // may append its own header after one the client wrote.
            Some(
                request
                    .metadata()
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .filter(|hops| !hops.is_empty())
            .as_deref(),
            self.throttle.trusted_proxies(),
        );
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        if request.email.trim().is_empty() {
            violations.add("email", "is required");
        } else if request.email.len() > MAX_EMAIL_LEN {
            violations.add("email", format!("must be at most {MAX_EMAIL_LEN} bytes"));
        } else if request.email.chars().any(char::is_control) {
            violations.add("email", "must not contain control characters");
        }
        if request.password.is_empty() {
            violations.add("password", "is required");
        } else if request.password.len() > MAX_PASSWORD_LEN {
            violations.add(
                "password",
                format!("must be at most {MAX_PASSWORD_LEN} bytes"),
            );
        }
        violations.into_result()?;
        // Throttled per email as typed (normalized), known or not: the answer
        // never tells whether an account exists.
        let parsed = Email::parse(&request.email);
        let throttle_key = parsed.as_ref().map_or_else(
            |_| request.email.trim().to_lowercase(),
            |e| e.as_str().to_owned(),
        );
        let attempt = self.throttle.attempt(&throttle_key, &client);
        let _in_flight = self
            .throttle
            .enter(&attempt)
            .ok_or_else(|| busy_sign_in(std::time::Duration::from_secs(1)))?;
        if let Some(throttled) = self.throttle.check(&attempt).await? {
            return Err(too_many_failures(throttled.retry_after));
        }
        // A malformed email cannot belong to anyone: same answer as unknown.
        let user = match parsed {
            Ok(email) => self.store.find_by_email(&email).await?,
            Err(_) => None,
        };
        let stored_hash = user.as_ref().map(|u| u.password_hash.clone());
        let password = request.password;
        let ok = self
            .hashing(move || auth::verify_password(&password, stored_hash.as_deref()))
            .await?;
        let Some(user) = user.filter(|_| ok) else {
            self.throttle.record_failure(&attempt).await?;
            return Err(Status::unauthenticated(BAD_CREDENTIALS));
        };
        self.throttle.record_success(&attempt).await?;
        let (token, claims) = self.tokens.issue(user.id, &user.email, Utc::now());
        Ok(Response::new(pb::AuthenticateResponse {
            access_token: token,
            expires_at: Some(contracts::timestamp(claims.expires_at())),
            user_id: user.id.to_string(),
        }))
    }

    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn validate_token(
        &self,
        request: Request<pb::ValidateTokenRequest>,
    ) -> Result<Response<pb::ValidateTokenResponse>, Status> {
        let token = request.into_inner().access_token;
        if token.is_empty() {
            return Err(status::invalid_argument("access_token", "is required"));
        }
        let claims = self.tokens.verify(&token, Utc::now()).map_err(|e| {
            tracing::info!(reason = %e, "token rejected");
            Status::unauthenticated(format!("access_token: {e}"))
        })?;
        Ok(Response::new(pb::ValidateTokenResponse {
            user_id: claims.sub.to_string(),
            email: claims.email.clone(),
            expires_at: Some(contracts::timestamp(claims.expires_at())),
        }))
    }

    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        // Only the signed-in user's own record: an email is personal data.
        let token = platform::auth::bearer_token(request.metadata())?;
        let claims = self.tokens.verify(token, Utc::now()).map_err(|e| {
            tracing::info!(reason = %e, "token rejected");
            Status::unauthenticated("authorization: token is invalid or expired")
        })?;
        let raw = request.into_inner().user_id;
        let id = Uuid::parse_str(&raw)
            .map_err(|_| status::invalid_argument("user_id", "must be a UUID"))?;
        if id != claims.sub {
            // Someone else's record does not exist, as far as this caller knows.
            return Err(Status::not_found(format!("user {id} not found")));
        }
        let user = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("user {id} not found")))?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(to_proto(&user)),
        }))
    }
}

/// The one mapping from the store's errors to `Status` (storage errors
/// arrive classified: UNAVAILABLE when the database could not be reached).
impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::EmailTaken => status::already_exists("email", "is already registered"),
            StoreError::Database(e) | StoreError::Append(AppendError::Database(e)) => e.into(),
            StoreError::Append(e) => status::internal(&e),
        }
    }
}
