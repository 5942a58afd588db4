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

/// A Postgres URL. Its password (in the user info or a `password=`
/// parameter) never prints: `Debug`, `Display` and serialization (`--env`,
/// the defaults) show the URL with the password as `***`, so operators still
/// see which server and database. Defaults carry no password.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    #[must_use]
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The URL itself, password included; call only to connect.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***`.
    #[must_use]
    pub fn redacted(&self) -> String {
        let url = &self.0;
        // The user info ends at the last `@`: a password may hold `/`, `?`
        // or `@` itself. A stray `@` later on redacts too much, never too
        // little.
        let mut out = match url.split_once("://") {
            Some((scheme, rest)) => match rest.rfind('@') {
                Some(at) => match rest[..at].split_once(':') {
                    Some((user, _password)) => format!("{scheme}://{user}:***@{}", &rest[at + 1..]),
                    None => url.clone(),
                },
                None => url.clone(),
            },
            None => url.clone(),
        };
        if let Some((path, query)) = out.split_once('?') {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            out = format!("{path}?{}", query.join("&"));
        }
        out
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for DatabaseUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

#[cfg(test)]
mod tests {
    use super::DatabaseUrl;

    #[test]
    fn a_database_url_never_prints_its_password() {
        let url =
            DatabaseUrl::new("postgres://shop:s3cret@db.internal:5432/shop_orders?sslmode=require");
        for shown in [
            format!("{url:?}"),
            url.to_string(),
            serde_json::to_string(&url).unwrap_or_default(),
        ] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(
                shown.contains("shop:***@db.internal:5432/shop_orders?sslmode=require"),
                "{shown}"
            );
        }
        let odd = DatabaseUrl::new("postgres://shop:pa/ss?w@rd@db:5432/shop");
        assert_eq!(odd.redacted(), "postgres://shop:***@db:5432/shop");
        let query = DatabaseUrl::new("postgres://db/shop?user=shop&password=s3cret");
        assert_eq!(
            query.redacted(),
            "postgres://db/shop?user=shop&password=***"
        );
        assert_eq!(
            url.expose(),
            "postgres://shop:s3cret@db.internal:5432/shop_orders?sslmode=require"
        );
    }

    #[test]
    fn a_database_url_without_a_password_is_shown_as_it_is() {
        let url = DatabaseUrl::new("postgres://postgres@127.0.0.1:5432/shop_users");
        assert_eq!(url.to_string(), url.expose());
    }
}
