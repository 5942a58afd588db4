//! Password hashing (argon2id) and access tokens (JWT, HS256, with a key id
//! so keys can rotate).

use std::collections::HashMap;

use argon2::{
    Argon2, PasswordHash,
    password_hash::{SaltString, rand_core::OsRng},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, TimeZone as _, Utc};
use hmac::{KeyInit as _, Mac as _};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

thread_local! {
    /// argon2's working memory (19 MiB with the default parameters), kept
    /// per hashing thread and reused: allocating it per call left every
    /// thread's malloc arena holding freed copies (hundreds of MB resident).
    static MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Stored hashes never need more memory than this (1 GiB of blocks).
const MAX_BLOCKS: usize = 1 << 20;

/// `argon2.hash_password(password, salt)` in this thread's reused memory.
fn hash_in_place<'a>(
    argon2: &Argon2<'_>,
    params: &argon2::Params,
    password: &[u8],
    salt: argon2::password_hash::Salt<'a>,
) -> Result<PasswordHash<'a>, argon2::password_hash::Error> {
    let blocks = params.block_count();
    if blocks > MAX_BLOCKS {
        return Err(argon2::password_hash::Error::ParamValueInvalid(
            argon2::password_hash::errors::InvalidValue::TooLong,
        ));
    }
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes)?;
    let output_len = params
        .output_len()
        .unwrap_or(argon2::Params::DEFAULT_OUTPUT_LEN);
    let output = MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        argon2::password_hash::Output::init_with(output_len, |out| {
            argon2
                .hash_password_into_with_memory(password, salt_bytes, out, &mut memory[..])
                .map_err(|_| argon2::password_hash::Error::Crypto)
        })
    })?;
    Ok(PasswordHash {
        algorithm: argon2::Algorithm::Argon2id.ident(),
        version: Some(argon2::Version::V0x13.into()),
        params: argon2::password_hash::ParamsString::try_from(params)?,
        salt: Some(salt),
        hash: Some(output),
    })
}

/// Hashes a password with argon2id (default parameters: 19 MiB, 2 passes).
/// CPU-bound: call from the hashing pool (`crate::hashing`).
///
/// # Errors
///
/// Fails only if argon2 rejects its own parameters.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    let params = argon2::Params::default();
    let argon2 = Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params.clone(),
    );
    Ok(hash_in_place(&argon2, &params, password.as_bytes(), salt.as_salt())?.to_string())
}

/// Checks `password` against a stored argon2id hash (its own parameters and
/// salt), in the reused memory; outputs compare in constant time.
fn verify_in_place(password: &[u8], stored: &PasswordHash<'_>) -> bool {
    if stored.algorithm != argon2::Algorithm::Argon2id.ident() {
        return false;
    }
    let (Ok(params), Some(salt), Some(expected)) = (
        argon2::Params::try_from(stored),
        stored.salt,
        stored.hash.as_ref(),
    ) else {
        return false;
    };
    let version = stored
        .version
        .map_or(Ok(argon2::Version::V0x13), argon2::Version::try_from);
    let Ok(version) = version else {
        return false;
    };
    let argon2 = Argon2::new(argon2::Algorithm::Argon2id, version, params.clone());
    hash_in_place(&argon2, &params, password, salt)
        .ok()
        .and_then(|computed| computed.hash)
        .is_some_and(|computed| computed == *expected)
}

/// Checks a password against a stored hash. `None` (unknown user) still costs
/// one full verification so both failures take the same time.
#[must_use]
pub fn verify_password(password: &str, stored_hash: Option<&str>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY.get_or_init(|| hash_password("not-a-real-password").unwrap_or_default());
    let (hash, known) = match stored_hash {
        Some(hash) => (hash, true),
        None => (dummy.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let matches = verify_in_place(password.as_bytes(), &parsed);
    known && matches
}

/// Claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub email: String,
    pub iss: String,
    pub iat: i64,
    pub exp: i64,
}

impl Claims {
    #[must_use]
    pub fn expires_at(&self) -> DateTime<Utc> {
        Utc.timestamp_opt(self.exp, 0).single().unwrap_or_default()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// Why a token was rejected. Callers answer all of these with the same
/// UNAUTHENTICATED; the kind is for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is signed with an unknown key")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token was issued by someone else")]
    WrongIssuer,
}

/// Signs and verifies access tokens. Holds the active key and any older keys
/// that tokens still in circulation may be signed with.
#[derive(Clone)]
pub struct TokenIssuer {
    active_kid: String,
    keys: HashMap<String, Vec<u8>>,
    issuer: String,
    ttl: chrono::Duration,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("active_kid", &self.active_kid)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// An issuer signing with `key` under `kid`.
    #[must_use]
    pub fn new(kid: &str, key: &[u8], issuer: &str, ttl: chrono::Duration) -> Self {
        Self {
            active_kid: kid.to_owned(),
            keys: HashMap::from([(kid.to_owned(), key.to_vec())]),
            issuer: issuer.to_owned(),
            ttl,
        }
    }

    /// Also accepts tokens signed with an older key.
    #[must_use]
    pub fn with_verification_key(mut self, kid: &str, key: &[u8]) -> Self {
        self.keys.insert(kid.to_owned(), key.to_vec());
        self
    }

    /// Issues a token for `user_id`, valid from `now` for the configured TTL.
    #[must_use]
    pub fn issue(&self, user_id: Uuid, email: &str, now: DateTime<Utc>) -> (String, Claims) {
        let claims = Claims {
            sub: user_id,
            email: email.to_owned(),
            iss: self.issuer.clone(),
            iat: now.timestamp(),
            exp: (now + self.ttl).timestamp(),
        };
        let header = Header {
            alg: "HS256".to_owned(),
            typ: "JWT".to_owned(),
            kid: self.active_kid.clone(),
        };
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default()),
        );
        let signature = self
            .mac(&self.active_kid, signing_input.as_bytes())
            .map(|mac| mac.finalize().into_bytes());
        let signature = signature
            .map(|s| URL_SAFE_NO_PAD.encode(s))
            .unwrap_or_default();
        (format!("{signing_input}.{signature}"), claims)
    }

    /// Verifies signature, issuer and expiry.
    ///
    /// # Errors
    ///
    /// See [`TokenError`].
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = decode_json(header)?;
        if header.alg != "HS256" {
            return Err(TokenError::Malformed);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let signing_input_len = token.len() - token.rsplit('.').next().map_or(0, str::len) - 1;
        let mac = self
            .mac(&header.kid, &token.as_bytes()[..signing_input_len])
            .ok_or(TokenError::UnknownKey)?;
        mac.verify_slice(&signature)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Claims = decode_json(claims)?;
        if claims.iss != self.issuer {
            return Err(TokenError::WrongIssuer);
        }
        if claims.exp <= now.timestamp() {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    fn mac(&self, kid: &str, data: &[u8]) -> Option<HmacSha256> {
        let key = self.keys.get(kid)?;
        let mut mac = HmacSha256::new_from_slice(key).ok()?;
        mac.update(data);
        Some(mac)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_interoperate_with_the_standard_argon2_api() {
        use argon2::{PasswordHasher as _, PasswordVerifier as _};
        let salt = SaltString::generate(&mut OsRng);
        let standard = Argon2::default()
            .hash_password(b"first password", &salt)
            .expect("hash")
            .to_string();
        assert!(verify_password("first password", Some(&standard)));
        assert!(!verify_password("second password", Some(&standard)));
        let ours = hash_password("first password").expect("hash");
        let parsed = PasswordHash::new(&ours).expect("PHC string");
        assert!(
            Argon2::default()
                .verify_password(b"first password", &parsed)
                .is_ok()
        );
        assert!(verify_password("first password", Some(&ours)));
        assert!(
            !verify_password("first password", None),
            "unknown users never match"
        );
    }

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(
            "k1",
            b"0123456789abcdef0123456789abcdef",
            "test",
            chrono::Duration::minutes(5),
        )
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let now = Utc::now();
        let user = Uuid::now_v7();
        let (token, claims) = issuer().issue(user, "a@b.co", now);
        assert_eq!(issuer().verify(&token, now).expect("valid").sub, user);
        assert_eq!(claims.exp - claims.iat, 300);
        assert_eq!(
            issuer().verify(&token, now + chrono::Duration::minutes(6)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn tampered_and_foreign_tokens_are_rejected() {
        let now = Utc::now();
        let (token, _) = issuer().issue(Uuid::now_v7(), "a@b.co", now);
        let mut tampered = token.clone();
        tampered.insert(token.find('.').expect("dot") + 3, 'x');
        assert!(issuer().verify(&tampered, now).is_err());
        let other = TokenIssuer::new(
            "k2",
            b"another-key-another-key-another!!",
            "test",
            chrono::Duration::minutes(5),
        );
        assert_eq!(other.verify(&token, now), Err(TokenError::UnknownKey));
        let same_kid = TokenIssuer::new(
            "k1",
            b"another-key-another-key-another!!",
            "test",
            chrono::Duration::minutes(5),
        );
        assert_eq!(same_kid.verify(&token, now), Err(TokenError::BadSignature));
        assert_eq!(
            issuer().verify("not.a.token", now),
            Err(TokenError::Malformed)
        );
        assert_eq!(issuer().verify("", now), Err(TokenError::Malformed));
    }

    #[test]
    fn a_rotated_key_still_verifies_old_tokens() {
        let now = Utc::now();
        let (token, _) = issuer().issue(Uuid::now_v7(), "a@b.co", now);
        let rotated = TokenIssuer::new(
            "k2",
            b"another-key-another-key-another!!",
            "test",
            chrono::Duration::minutes(5),
        )
        .with_verification_key("k1", b"0123456789abcdef0123456789abcdef");
        assert!(rotated.verify(&token, now).is_ok());
    }

    #[test]
    fn passwords_verify_and_unknown_users_never_do() {
        let hash = hash_password("correct horse").expect("hash");
        assert!(verify_password("correct horse", Some(&hash)));
        assert!(!verify_password("wrong horse", Some(&hash)));
        assert!(!verify_password("not-a-real-password", None));
    }

    proptest::proptest! {
        /// Untrusted tokens: arbitrary text, and three base64 segments with
        /// arbitrary JSON-ish content, are rejected without panicking.
        #[test]
        fn no_token_from_outside_verifies_or_panics(raw in "\\PC{0,200}") {
            proptest::prop_assert!(issuer().verify(&raw, Utc::now()).is_err());
        }

        #[test]
        fn forged_segments_never_verify(
            header in "\\PC{0,80}",
            claims in "\\PC{0,120}",
            signature in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48),
        ) {
            let token = format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(claims),
                URL_SAFE_NO_PAD.encode(signature),
            );
            proptest::prop_assert!(issuer().verify(&token, Utc::now()).is_err());
        }
    }
}
