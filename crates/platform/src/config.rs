//! Typed configuration: defaults, overridden by `APP_...` environment
//! variables (`APP_DATABASE_URL`, nested fields with `__`, e.g.
//! `APP_AUTH__TOKEN_TTL_SECS`). Loaded once in `main` and passed by value.

use figment::{
    Figment,
    providers::{Env, Serialized},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Loads `T` from its defaults and the `APP_` environment.
///
/// # Errors
///
/// Fails when a variable does not parse into its field's type; the error
/// names the field.
pub fn load<T: Serialize + DeserializeOwned + Default>() -> Result<T, Box<figment::Error>> {
    Figment::from(Serialized::defaults(T::default()))
        .merge(Env::prefixed("APP_").split("__"))
        .extract()
        .map_err(Box::new)
}

/// A secret value: never printed, never serialized back out.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    #[must_use]
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is used.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}
