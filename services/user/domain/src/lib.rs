//! The user domain: parsed value types (email, password) and the events a
//! user's life produces. Pure: no I/O, no async, no framework types.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A normalized email address: trimmed, lower-cased, one `@`, a dotted
/// domain, at most 254 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

/// Why an email address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    #[error("is required")]
    Empty,
    #[error("must be at most 254 characters")]
    TooLong,
    #[error("must look like name@example.com")]
    Malformed,
}

impl Email {
    /// # Errors
    ///
    /// See [`EmailError`].
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        let email = raw.trim().to_lowercase();
        if email.is_empty() {
            return Err(EmailError::Empty);
        }
        if email.len() > 254 {
            return Err(EmailError::TooLong);
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(EmailError::Malformed);
        };
        let domain_ok = domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains("..")
            && domain
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '@');
        if domain_ok && local_ok {
            Ok(Self(email))
        } else {
            Err(EmailError::Malformed)
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Email {
    type Error = EmailError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Email> for String {
    fn from(value: Email) -> Self {
        value.0
    }
}

impl std::fmt::Display for Email {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A password that meets the policy: 8 to 128 characters, not only
/// whitespace. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

/// Why a password was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("is required")]
    Empty,
    #[error("must be at least {min} characters", min = Password::MIN_CHARS)]
    TooShort,
    #[error("must be at most {max} characters", max = Password::MAX_CHARS)]
    TooLong,
    #[error("must not be only whitespace")]
    Blank,
}

impl Password {
    pub const MIN_CHARS: usize = 8;
    pub const MAX_CHARS: usize = 128;

    /// # Errors
    ///
    /// See [`PasswordError`].
    pub fn parse(raw: &str) -> Result<Self, PasswordError> {
        let chars = raw.chars().count();
        if chars == 0 {
            Err(PasswordError::Empty)
        } else if chars < Self::MIN_CHARS {
            Err(PasswordError::TooShort)
        } else if chars > Self::MAX_CHARS {
            Err(PasswordError::TooLong)
        } else if raw.trim().is_empty() {
            Err(PasswordError::Blank)
        } else {
            Ok(Self(raw.to_owned()))
        }
    }

    /// The password itself, for hashing only.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

/// What happened to a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UserEvent {
    /// A user registered.
    Created { user_id: Uuid, email: Email },
}

impl es::DomainEvent for UserEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Created { .. } => "user.created",
        }
    }
}

/// Stream id prefix of users in the event store.
pub const STREAM_PREFIX: &str = "user";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_normalized() {
        let email = Email::parse("  Ada@Example.COM ").expect("valid");
        assert_eq!(email.as_str(), "ada@example.com");
    }

    #[test]
    fn malformed_emails_are_refused() {
        for raw in [
            "",
            "   ",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "ada@@x.com",
            "a b@x.com",
            "ada@.x.com",
            "ada@x..com",
        ] {
            assert!(Email::parse(raw).is_err(), "{raw:?} should be refused");
        }
    }

    #[test]
    fn password_policy_is_enforced() {
        assert_eq!(Password::parse(""), Err(PasswordError::Empty));
        assert_eq!(Password::parse("short"), Err(PasswordError::TooShort));
        assert_eq!(Password::parse("        "), Err(PasswordError::Blank));
        assert_eq!(
            Password::parse(&"x".repeat(129)),
            Err(PasswordError::TooLong)
        );
        assert!(Password::parse("correct horse").is_ok());
    }

    #[test]
    fn password_never_prints() {
        let password = Password::parse("hunter2hunter2").expect("valid");
        assert_eq!(format!("{password:?}"), "Password(***)");
    }
}
