//! What commands carry besides the order's own values: the amount paid and
//! the client's idempotency key. Constructors parse; a value that exists is
//! valid.

/// An amount paid, in minor units of the order's currency: never negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amount(i64);

/// Why an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("must not be negative")]
    Negative,
}

impl Amount {
    /// # Errors
    ///
    /// [`AmountError::Negative`].
    pub fn new(minor: i64) -> Result<Self, AmountError> {
        if minor < 0 {
            Err(AmountError::Negative)
        } else {
            Ok(Self(minor))
        }
    }

    #[must_use]
    pub fn minor(self) -> i64 {
        self.0
    }
}

/// What a client sends to make a command safe to retry: at most
/// [`IdempotencyKey::MAX_LEN`] bytes, no control characters (NUL cannot be
/// stored at all). Empty means the command has none.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why an idempotency key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("must be at most {max} characters", max = IdempotencyKey::MAX_LEN)]
    TooLong,
    #[error("must not contain control characters")]
    ControlCharacter,
}

impl IdempotencyKey {
    pub const MAX_LEN: usize = 128;

    /// `None` for an empty key (the command has none).
    ///
    /// # Errors
    ///
    /// [`KeyError::TooLong`] or [`KeyError::ControlCharacter`].
    pub fn parse(raw: &str) -> Result<Option<Self>, KeyError> {
        if raw.len() > Self::MAX_LEN {
            Err(KeyError::TooLong)
        } else if raw.chars().any(char::is_control) {
            Err(KeyError::ControlCharacter)
        } else if raw.is_empty() {
            Ok(None)
        } else {
            Ok(Some(Self(raw.to_owned())))
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
