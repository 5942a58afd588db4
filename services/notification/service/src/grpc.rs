//! The `shop.notification.v1.NotificationService` API.

use contracts::notification::v1::{self as pb, notification_service_server::NotificationService};
use platform::{
    auth::Authenticator,
    status::{self, FieldViolations},
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    store::{NotificationRecord, NotificationStore, Webhook},
    watch::{Hub, Recorded},
};

/// Handlers of `NotificationService`.
#[derive(Debug, Clone)]
pub struct NotificationApi {
    store: NotificationStore,
    auth: Authenticator,
    hub: Hub,
    /// Where webhooks may point (checked at registration).
    egress: crate::egress::Egress,
    limits: crate::config::UserLimits,
    /// Open watch streams per user on this replica.
    watches: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Uuid, u32>>>,
    /// Ends open watch streams, so a graceful shutdown does not wait on them.
    shutdown: tokio_util::sync::CancellationToken,
}

/// One open watch stream, counted against its user's cap until dropped.
struct WatchSlot {
    watches: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<Uuid, u32>>>,
    user: Uuid,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        if let Ok(mut watches) = self.watches.lock()
            && let Some(open) = watches.get_mut(&self.user)
        {
            *open = open.saturating_sub(1);
            if *open == 0 {
                watches.remove(&self.user);
            }
        }
    }
}

impl NotificationApi {
    #[must_use]
    pub fn new(
        store: NotificationStore,
        auth: Authenticator,
        hub: Hub,
        egress: crate::egress::Egress,
        limits: crate::config::UserLimits,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            store,
            auth,
            hub,
            egress,
            limits,
            watches: std::sync::Arc::default(),
            shutdown,
        }
    }

    /// A watch slot for `user`, or RESOURCE_EXHAUSTED at the cap.
    fn open_watch(&self, user: Uuid) -> Result<WatchSlot, Status> {
        let mut watches = self
            .watches
            .lock()
            .map_err(|_| Status::internal("watch registry poisoned"))?;
        let open = watches.entry(user).or_insert(0);
        if *open >= self.limits.watches_per_user {
            return Err(Status::resource_exhausted(format!(
                "at most {} open watch streams per user; close one first",
                self.limits.watches_per_user
            )));
        }
        *open += 1;
        Ok(WatchSlot {
            watches: std::sync::Arc::clone(&self.watches),
            user,
        })
    }
}

fn webhook_to_proto(hook: &Webhook) -> pb::Webhook {
    pb::Webhook {
        id: hook.id.to_string(),
        url: hook.url.clone(),
        created_at: Some(contracts::timestamp(hook.created_at)),
    }
}

/// A webhook URL: absolute http(s), at most 2000 characters, no credentials.
fn parse_webhook_url(raw: &str) -> Result<reqwest::Url, &'static str> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("is required");
    }
    if raw.len() > 2000 {
        return Err("must be at most 2000 characters");
    }
    let url = reqwest::Url::parse(raw).map_err(|_| "must be an absolute http(s) URL")?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("must be an absolute http(s) URL");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain credentials");
    }
    Ok(url)
}

fn new_secret() -> String {
    use rand::RngCore as _;
    let mut bytes = [0_u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("whsec_{}", platform::hex::encode(&bytes))
}

type WatchStream = std::pin::Pin<
    Box<
        dyn futures::Stream<Item = Result<pb::WatchNotificationsResponse, Status>> + Send + 'static,
    >,
>;

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
    type WatchNotificationsStream = WatchStream;

    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn watch_notifications(
        &self,
        request: Request<pb::WatchNotificationsRequest>,
    ) -> Result<Response<Self::WatchNotificationsStream>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let slot = self.open_watch(caller.user_id)?;
        let mut recorded = self.hub.subscribe();
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        // The stream ends when the caller's token does: a watcher must sign
        // in again, as every other call must.
        let expires_in = caller
            .expires_at
            .and_then(|at| (at - chrono::Utc::now()).to_std().ok())
            .unwrap_or_default();
        let expiry = tokio::time::sleep(expires_in);
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(expiry);
            loop {
                let recorded = tokio::select! {
                    () = sender.closed() => return,
                    () = shutdown.cancelled() => return,
                    () = &mut expiry => {
                        let _ = sender
                            .send(Err(Status::unauthenticated("authorization: token expired; sign in and watch again")))
                            .await;
                        return;
                    }
                    next = recorded.recv() => match next {
                        Ok(next) => next,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            let status = Status::data_loss(format!("watcher fell {missed} notifications behind; list and watch again"));
                            let _ = sender.send(Err(status)).await;
                            return;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                };
                if recorded.user_id() != caller.user_id {
                    continue;
                }
                let item = match recorded {
                    Recorded::Whole(n) => Ok(pb::WatchNotificationsResponse {
                        notification: Some(to_proto(&n)),
                    }),
                    Recorded::ById { id, .. } => match store.get(id).await {
                        Ok(Some(n)) => Ok(pb::WatchNotificationsResponse {
                            notification: Some(to_proto(&n)),
                        }),
                        Ok(None) => continue,
                        Err(e) => Err(e.into()),
                    },
                };
                if sender.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn register_webhook(
        &self,
        request: Request<pb::RegisterWebhookRequest>,
    ) -> Result<Response<pb::RegisterWebhookResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let url = parse_webhook_url(&request.get_ref().url)
            .and_then(|url| self.egress.check_url(&url).map(|()| url))
            .map_err(|e| status::invalid_argument("url", e))?;
        let secret = new_secret();
        let limit = self.limits.webhooks_per_user;
        let hook = self
            .store
            .add_webhook(caller.user_id, url.as_str(), &secret, limit)
            .await?
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "at most {limit} webhooks per user; delete one first"
                ))
            })?;
        Ok(Response::new(pb::RegisterWebhookResponse {
            webhook: Some(webhook_to_proto(&hook)),
            secret,
        }))
    }

    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn list_webhooks(
        &self,
        request: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let hooks = self.store.webhooks(caller.user_id).await?;
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: hooks.iter().map(webhook_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all, err(level = "info"))]
    async fn delete_webhook(
        &self,
        request: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        let caller = self.auth.authenticate(request.metadata()).await?;
        let id = Uuid::parse_str(request.get_ref().webhook_id.trim())
            .map_err(|_| status::invalid_argument("webhook_id", "must be a UUID"))?;
        if !self.store.delete_webhook(caller.user_id, id).await? {
            return Err(Status::not_found(format!("webhook {id} not found")));
        }
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }

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
        let page =
            platform::paging::parse::<i64>(&mut violations, request.page_size, &request.page_token);
        let (Some(user_id), Some(page)) = (user_id, page) else {
            return Err(violations.into_status());
        };
        let rows = self
            .store
            .list(user_id, page.after, page.fetch_limit())
            .await?;
        let (rows, next_page_token) = page.finish(rows, |n| n.seq.to_string());
        Ok(Response::new(pb::ListNotificationsResponse {
            notifications: rows.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Untrusted webhook URLs: whatever is accepted is an absolute
        /// http(s) URL with a host, no credentials, and passes the egress
        /// policy (public addresses only by default); nothing panics.
        #[test]
        fn only_public_http_urls_are_accepted(raw in "\\PC{0,120}") {
            check_any(&raw)?;
        }

        #[test]
        fn url_shaped_input_is_judged_not_panicked(
            scheme in "(http|https|ftp|file|javascript)",
            host in "(\\PC{0,20}|[0-9]{1,10}|0x[0-9a-f]{1,8}|\\[[0-9a-f:.]{0,40}\\]|[a-z.]{1,20})",
            rest in "\\PC{0,40}",
        ) {
            check_any(&format!("{scheme}://{host}{rest}"))?;
        }
    }

    fn check_any(raw: &str) -> Result<(), proptest::test_runner::TestCaseError> {
        let egress = crate::egress::Egress::default();
        if let Ok(url) = parse_webhook_url(raw)
            && egress.check_url(&url).is_ok()
        {
            proptest::prop_assert!(matches!(url.scheme(), "http" | "https"));
            proptest::prop_assert!(url.username().is_empty() && url.password().is_none());
            match url.host() {
                Some(url::Host::Ipv4(ip)) => {
                    proptest::prop_assert!(crate::egress::is_public(ip.into()), "{url}");
                }
                Some(url::Host::Ipv6(ip)) => {
                    proptest::prop_assert!(crate::egress::is_public(ip.into()), "{url}");
                }
                Some(url::Host::Domain(name)) => proptest::prop_assert!(!name.is_empty()),
                None => proptest::prop_assert!(false, "no host: {url}"),
            }
        }
        Ok(())
    }
}
