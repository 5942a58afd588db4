//! The dead-letter stream. JetStream has no DLQ of its own: a consumer that
//! gives up on a message publishes it here (original payload and headers,
//! plus why, how often it was tried, the last error) and terminates it.
//! Operators list, inspect and redrive from here (`shopctl dlq ...`).

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;

use crate::{MessagingError, StreamLimits, StreamSpec, ensure_stream};

/// Dead letters of every consumer, one subject per consumer: `dlq.<consumer>`.
pub const DLQ_STREAM: StreamSpec = StreamSpec {
    name: "DLQ",
    subjects: &["dlq.>"],
};

/// Headers added to a dead letter.
pub mod headers {
    pub const REASON: &str = "Shop-Dlq-Reason";
    pub const ATTEMPTS: &str = "Shop-Dlq-Attempts";
    pub const LAST_ERROR: &str = "Shop-Dlq-Last-Error";
    pub const SUBJECT: &str = "Shop-Dlq-Subject";
    pub const CONSUMER: &str = "Shop-Dlq-Consumer";
    pub const DEAD_AT: &str = "Shop-Dlq-Dead-At";
    /// On a redriven message: the dead-letter sequence it came from.
    pub const REDRIVEN_FROM: &str = "Shop-Redriven-From";
}

/// Why a message is being dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<'a> {
    pub consumer: &'a str,
    /// Short, stable reason, e.g. `max deliveries reached` or `undecodable`.
    pub reason: &'a str,
    pub attempts: i64,
    pub last_error: &'a str,
}

/// A dead letter as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Its sequence in the DLQ stream: the id operators use.
    pub sequence: u64,
    /// Where it was originally published.
    pub subject: String,
    pub consumer: String,
    pub reason: String,
    pub attempts: i64,
    pub last_error: String,
    pub dead_at: String,
    /// The event id, when the original carried one.
    pub event_id: Option<String>,
    pub traceparent: Option<String>,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

fn header(map: &HeaderMap, name: &str) -> Option<String> {
    map.get(name).map(ToString::to_string)
}

/// Publishes a dead letter and waits for JetStream to store it.
///
/// # Errors
///
/// When JetStream does not acknowledge it; the caller must then not
/// terminate the original (it will be redelivered).
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    original_headers: Option<&HeaderMap>,
    payload: Bytes,
    failure: &Failure<'_>,
) -> Result<(), MessagingError> {
    let mut map = HeaderMap::new();
    if let Some(original) = original_headers {
        // A redriven message carries a fresh message id but its own event
        // id: the event id wins, the message id stands in when there is none.
        let has_event_id = original.get(crate::headers::EVENT_ID).is_some();
        for (name, values) in original.iter() {
            let name_str: &str = name.as_ref();
            if name_str.eq_ignore_ascii_case(async_nats::header::NATS_MESSAGE_ID.as_ref()) {
                // Keep it for reference, but do not let it deduplicate here.
                if let Some(value) = values.first()
                    && !has_event_id
                {
                    map.insert(crate::headers::EVENT_ID, value.as_str());
                }
                continue;
            }
            for value in values {
                map.append(name.clone(), value.clone());
            }
        }
    }
    map.insert(headers::SUBJECT, subject);
    map.insert(headers::CONSUMER, failure.consumer);
    map.insert(headers::REASON, failure.reason);
    map.insert(headers::ATTEMPTS, failure.attempts.to_string().as_str());
    map.insert(
        headers::LAST_ERROR,
        truncate(failure.last_error, 1000).as_str(),
    );
    map.insert(headers::DEAD_AT, chrono::Utc::now().to_rfc3339().as_str());
    let target = format!("dlq.{}", failure.consumer);
    js.publish_with_headers(target.clone(), map, payload)
        .await
        .map_err(|source| MessagingError::Publish {
            subject: target.clone(),
            source,
        })?
        .await
        .map_err(|source| MessagingError::Publish {
            subject: target,
            source,
        })?;
    Ok(())
}

fn truncate(text: &str, max: usize) -> String {
    // Header values are single-line.
    let line = text.replace(['\r', '\n'], " ");
    match line.char_indices().nth(max) {
        Some((i, _)) => line[..i].to_owned(),
        None => line,
    }
}

/// Errors of the operator tools.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Messaging(#[from] MessagingError),
    #[error("reading the DLQ stream: {0}")]
    Read(String),
    #[error("dead letter {0} not found")]
    NotFound(u64),
}

async fn stream(js: &jetstream::Context) -> Result<jetstream::stream::Stream, DlqError> {
    Ok(ensure_stream(js, DLQ_STREAM, &StreamLimits::default()).await?)
}

async fn fetch(stream: &jetstream::stream::Stream, sequence: u64) -> Result<DeadLetter, DlqError> {
    let message = stream
        .get_raw_message(sequence)
        .await
        .map_err(|_| DlqError::NotFound(sequence))?;
    let h = &message.headers;
    Ok(DeadLetter {
        sequence,
        subject: header(h, headers::SUBJECT).unwrap_or_default(),
        consumer: header(h, headers::CONSUMER).unwrap_or_default(),
        reason: header(h, headers::REASON).unwrap_or_default(),
        attempts: header(h, headers::ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        last_error: header(h, headers::LAST_ERROR).unwrap_or_default(),
        dead_at: header(h, headers::DEAD_AT).unwrap_or_default(),
        event_id: header(h, crate::headers::EVENT_ID),
        traceparent: header(h, crate::headers::TRACEPARENT),
        headers: message.headers.clone(),
        payload: message.payload.clone(),
    })
}

/// Every dead letter still in the stream, oldest first.
///
/// # Errors
///
/// When JetStream is unreachable.
pub async fn list(js: &jetstream::Context) -> Result<Vec<DeadLetter>, DlqError> {
    let mut stream = stream(js).await?;
    let state = stream
        .info()
        .await
        .map_err(|e| DlqError::Read(e.to_string()))?
        .state
        .clone();
    let mut letters = Vec::new();
    if state.messages == 0 {
        return Ok(letters);
    }
    for sequence in state.first_sequence..=state.last_sequence {
        match fetch(&stream, sequence).await {
            Ok(letter) => letters.push(letter),
            Err(DlqError::NotFound(_)) => {} // deleted (redriven)
            Err(error) => return Err(error),
        }
    }
    Ok(letters)
}

/// One dead letter.
///
/// # Errors
///
/// [`DlqError::NotFound`] for an unknown sequence.
pub async fn show(js: &jetstream::Context, sequence: u64) -> Result<DeadLetter, DlqError> {
    fetch(&stream(js).await?, sequence).await
}

/// Publishes the dead letter's original payload and headers to its original
/// subject again, then removes it from the DLQ. Subscribers are idempotent
/// per event, so what was already delivered is not delivered again.
///
/// # Errors
///
/// When JetStream is unreachable or the sequence is unknown.
pub async fn redrive(js: &jetstream::Context, sequence: u64) -> Result<DeadLetter, DlqError> {
    let stream = stream(js).await?;
    let letter = fetch(&stream, sequence).await?;
    let mut map = HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name_str: &str = name.as_ref();
        if name_str.starts_with("Shop-Dlq-") {
            continue;
        }
        for value in values {
            map.append(name.clone(), value.clone());
        }
    }
    map.insert(headers::REDRIVEN_FROM, sequence.to_string().as_str());
    // A fresh id: the original's may still be inside the duplicate window.
    map.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("redrive-{sequence}-{}", uuid::Uuid::now_v7()).as_str(),
    );
    let subject = letter.subject.clone();
    js.publish_with_headers(subject.clone(), map, letter.payload.clone())
        .await
        .map_err(|source| MessagingError::Publish {
            subject: subject.clone(),
            source,
        })?
        .await
        .map_err(|source| MessagingError::Publish { subject, source })?;
    stream
        .delete_message(sequence)
        .await
        .map_err(|e| DlqError::Read(e.to_string()))?;
    Ok(letter)
}
