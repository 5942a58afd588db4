//! The `shop.notification.v1.NotificationService` API.

use contracts::notification::v1::{self as pb, notification_service_server::NotificationService};
use platform::{
    auth::Authenticator,
    status::{self, FieldViolations},
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::store::{NotificationRecord, NotificationStore};

/// Handlers of `NotificationService`.
#[derive(Debug, Clone)]
pub struct NotificationApi {
    store: NotificationStore,
    auth: Authenticator,
}

impl NotificationApi {
    #[must_use]
    pub fn new(store: NotificationStore, auth: Authenticator) -> Self {
        Self { store, auth }
    }
}

const DEFAULT_PAGE_SIZE: i64 = 20;
const MAX_PAGE_SIZE: i32 = 100;

fn to_proto(n: &NotificationRecord) -> pb::Notification {
    pb::Notification {
        id: n.id.to_string(),
        user_id: n.user_id.to_string(),
        event_type: n.event_type.clone(),
        event_id: n.event_id.to_string(),
        channel: n.channel.clone(),
        subject: n.subject.clone(),
        body: n.body.clone(),
        occurred_at: Some(contracts::timestamp(n.occurred_at)),
        created_at: Some(contracts::timestamp(n.created_at)),
    }
}

#[tonic::async_trait]
impl NotificationService for NotificationApi {
    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn list_notifications(
        &self,
        request: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        // Empty means the caller; anyone else's list is not theirs to read.
        let user_id = if request.user_id.trim().is_empty() {
            Some(caller.user_id)
        } else {
            violations.check(
                "user_id",
                Uuid::parse_str(request.user_id.trim()).map_err(|_| "must be a UUID"),
            )
        };
        if user_id.is_some_and(|id| id != caller.user_id) {
            return Err(Status::permission_denied(
                "user_id: you can only list your own notifications",
            ));
        }
        let page_size = match request.page_size {
            0 => Some(DEFAULT_PAGE_SIZE),
            n @ 1..=MAX_PAGE_SIZE => Some(i64::from(n)),
            _ => {
                violations.add(
                    "page_size",
                    format!("must be between 1 and {MAX_PAGE_SIZE}"),
                );
                None
            }
        };
        let before = if request.page_token.is_empty() {
            Some(None)
        } else {
            violations.check(
                "page_token",
                request
                    .page_token
                    .parse::<i64>()
                    .map(Some)
                    .map_err(|_| "is not a token this service issued"),
            )
        };
        let (Some(user_id), Some(page_size), Some(before)) = (user_id, page_size, before) else {
            return Err(violations.into_status());
        };
        let mut page = self
            .store
            .list(user_id, before, page_size + 1)
            .await
            .map_err(|e| status::from_sqlx(&e))?;
        let more = page.len() > usize::try_from(page_size).unwrap_or(usize::MAX);
        page.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
        let next_page_token = match page.last() {
            Some(last) if more => last.seq.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListNotificationsResponse {
            notifications: page.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }
}
