//! Authenticates callers by asking user-service to validate their bearer
//! token (gRPC with a deadline).

use std::time::Duration;

use contracts::user::v1::{ValidateTokenRequest, user_service_client::UserServiceClient};
use tonic::{Code, Status, metadata::MetadataMap, transport::Channel};
use uuid::Uuid;

/// The caller, as user-service vouched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user_id: Uuid,
}

/// A client of user-service's `ValidateToken`.
#[derive(Debug, Clone)]
pub struct Authenticator {
    client: UserServiceClient<Channel>,
    timeout: Duration,
}

impl Authenticator {
    /// Connects lazily: user-service may start after us.
    ///
    /// # Errors
    ///
    /// Fails when `url` is not a valid URI.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, platform::StartError> {
        let channel = Channel::from_shared(url.to_owned())
            .map_err(|e| platform::StartError::Other(format!("user_service_url {url:?}: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy();
        Ok(Self {
            client: UserServiceClient::new(channel),
            timeout,
        })
    }

    /// Validates the `authorization: Bearer <token>` metadata.
    ///
    /// # Errors
    ///
    /// UNAUTHENTICATED for a missing or rejected token, UNAVAILABLE when
    /// user-service cannot answer within the deadline.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let token = bearer_token(metadata)?;
        let mut request = tonic::Request::new(ValidateTokenRequest {
            access_token: token.to_owned(),
        });
        request.set_timeout(self.timeout);
        let response = self
            .client
            .clone()
            .validate_token(request)
            .await
            .map_err(|status| match status.code() {
                Code::Unauthenticated | Code::InvalidArgument => {
                    Status::unauthenticated("authorization: token is invalid or expired")
                }
                _ => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "user-service call failed");
                    Status::unavailable("user-service is unavailable; retry later")
                }
            })?;
        let user_id = Uuid::parse_str(&response.into_inner().user_id).map_err(|_| {
            tracing::error!("user-service returned a malformed user id");
            Status::unavailable("user-service gave an invalid answer; retry later")
        })?;
        Ok(Caller { user_id })
    }
}

fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let missing = || Status::unauthenticated("authorization: a `Bearer <token>` is required");
    let value = metadata
        .get("authorization")
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(missing)?;
    Ok(token)
}
