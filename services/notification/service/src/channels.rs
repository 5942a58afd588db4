//! The delivery channels: log, email (SMTP) and webhooks (signed HTTP POST).

use std::time::Duration;

use hmac::{KeyInit as _, Mac as _};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
use uuid::Uuid;

use crate::config::SmtpSettings;

/// Why a delivery failed. Always retried (with backoff) until the message
/// is dead-lettered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("email: {0}")]
    Email(String),
    #[error("webhook {url}: {reason}")]
    Webhook { url: String, reason: String },
}

/// What is being delivered.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub user_id: Uuid,
    pub order_id: Option<Uuid>,
    pub subject: &'a str,
    pub body: &'a str,
}

/// Sends mail through one SMTP server.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Mailer {
    /// # Errors
    ///
    /// When the `From:` address or the TLS setup is invalid.
    pub fn new(settings: &SmtpSettings) -> Result<Self, DeliveryError> {
        let builder = if settings.starttls {
            AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&settings.host)
                .map_err(|e| DeliveryError::Email(e.to_string()))?
        } else {
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
        };
        let mut builder = builder
            .port(settings.port)
            .timeout(Some(Duration::from_millis(settings.timeout_ms)));
        if !settings.username.is_empty() {
            builder =
                builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
                    settings.username.clone(),
                    settings.password.expose().to_owned(),
                ));
        }
        Ok(Self {
            transport: builder.build(),
            from: settings.from.parse().map_err(|e| {
                DeliveryError::Email(format!("from address {:?}: {e}", settings.from))
            })?,
        })
    }

    /// Sends one mail. Its `Message-ID` is derived from the event, so a
    /// receiving system can drop a repeat.
    ///
    /// # Errors
    ///
    /// When the server refuses or cannot be reached.
    pub async fn send(&self, to: &str, message: &Outgoing<'_>) -> Result<(), DeliveryError> {
        let email = lettre::Message::builder()
            .from(self.from.clone())
            .to(to
                .parse()
                .map_err(|e| DeliveryError::Email(format!("recipient {to:?}: {e}")))?)
            .subject(message.subject)
            .message_id(Some(format!(
                "<{}.email@shop.notifications>",
                message.event_id
            )))
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(message.body.to_owned())
            .map_err(|e| DeliveryError::Email(e.to_string()))?;
        self.transport
            .send(email)
            .await
            .map_err(|e| DeliveryError::Email(e.to_string()))?;
        Ok(())
    }
}

/// Header names of a webhook delivery.
pub mod webhook_headers {
    /// The event id: receivers drop repeats by it.
    pub const ID: &str = "Shop-Webhook-Id";
    /// Unix seconds when it was signed.
    pub const TIMESTAMP: &str = "Shop-Webhook-Timestamp";
    /// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
    pub const SIGNATURE: &str = "Shop-Webhook-Signature";
}

/// `v1=<hex>` signature of `body` sent at `timestamp`.
#[must_use]
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!("v1={}", platform::hex::encode(&digest))
}

/// POSTs signed JSON to webhook endpoints.
#[derive(Debug, Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    egress: std::sync::Arc<crate::egress::Egress>,
}

impl WebhookSender {
    /// # Errors
    ///
    /// When the HTTP client cannot be built (no TLS provider).
    pub fn new(timeout: Duration, egress: crate::egress::Egress) -> Result<Self, DeliveryError> {
        // reqwest is built without a default crypto provider: install ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let egress = std::sync::Arc::new(egress);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent("shop-notifications/1")
            // A redirect could point anywhere, past the address checks.
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(std::sync::Arc::new(crate::egress::Resolver(
                std::sync::Arc::clone(&egress),
            )))
            .build()
            .map_err(|e| DeliveryError::Webhook {
                url: String::new(),
                reason: e.to_string(),
            })?;
        Ok(Self { client, egress })
    }

    /// Sends one notification; any 2xx is success.
    ///
    /// # Errors
    ///
    /// A non-2xx answer, a timeout or a connection failure.
    pub async fn send(
        &self,
        url: &str,
        secret: &str,
        message: &Outgoing<'_>,
    ) -> Result<(), DeliveryError> {
        let body = serde_json::json!({
            "id": message.event_id,
            "type": message.event_type,
            "occurred_at": message.occurred_at.to_rfc3339(),
            "user_id": message.user_id,
            "order_id": message.order_id,
            "subject": message.subject,
            "body": message.body,
        })
        .to_string();
        let timestamp = chrono::Utc::now().timestamp();
        let failed = |reason: String| DeliveryError::Webhook {
            url: url.to_owned(),
            reason,
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| failed(e.to_string()))?;
        self.egress.check_send(&parsed).map_err(failed)?;
        let response = self
            .client
            .post(parsed)
            .header("content-type", "application/json")
            .header(webhook_headers::ID, message.event_id.to_string())
            .header(webhook_headers::TIMESTAMP, timestamp.to_string())
            .header(
                webhook_headers::SIGNATURE,
                sign(secret, timestamp, body.as_bytes()),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(failed(format!("answered {}", response.status())))
        }
    }
}
