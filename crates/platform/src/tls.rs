//! TLS for gRPC, configured by file paths (PEM; mounted Kubernetes secrets
//! in production). Servers: `APP_TLS__CERT_FILE` + `APP_TLS__KEY_FILE`, and
//! `APP_TLS__CLIENT_CA_FILE` to require client certificates signed by that
//! CA (mutual TLS). Clients (a downstream's settings, e.g.
//! `APP_USER_SERVICE__TLS__*`): `CA_FILE` to trust (else the system roots
//! when the URL is `https`), `CERT_FILE` + `KEY_FILE` to present, `DOMAIN`
//! to check instead of the URL's host. Files are read at start-up, so a
//! missing or malformed one stops the service with a message naming it.
//! The admin port (`/metrics`, probes) stays plain HTTP: it is scraped and
//! probed inside the cluster, and a NetworkPolicy guards it.

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::StartError;

/// Installs ring as rustls' process-wide crypto provider (our tree carries
/// no other); harmless when one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A gRPC server's TLS files; all empty: plaintext.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerTls {
    pub cert_file: String,
    pub key_file: String,
    /// Require client certificates signed by this CA (mutual TLS).
    pub client_ca_file: String,
}

/// A gRPC client's TLS files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientTls {
    /// The CA to trust; empty: the system's roots.
    pub ca_file: String,
    /// A client certificate and key to present (mutual TLS).
    pub cert_file: String,
    pub key_file: String,
    /// The name the server's certificate must carry, if not the URL's host.
    pub domain: String,
}

fn read(setting: &str, path: &str) -> Result<Vec<u8>, StartError> {
    std::fs::read(path).map_err(|e| StartError::setting(format!("{setting} {path}"), e))
}

fn identity(prefix: &str, cert_file: &str, key_file: &str) -> Result<Identity, StartError> {
    match (cert_file.is_empty(), key_file.is_empty()) {
        (false, false) => Ok(Identity::from_pem(
            read(&format!("{prefix}CERT_FILE"), cert_file)?,
            read(&format!("{prefix}KEY_FILE"), key_file)?,
        )),
        _ => Err(StartError::setting(
            format!("{prefix}CERT_FILE"),
            format!("{prefix}CERT_FILE and {prefix}KEY_FILE must be set together"),
        )),
    }
}

impl ServerTls {
    /// The server configuration; `None` when no file is set (plaintext).
    ///
    /// # Errors
    ///
    /// A file that cannot be read, or a certificate without its key.
    pub fn config(&self) -> Result<Option<ServerTlsConfig>, StartError> {
        if self.cert_file.is_empty() && self.key_file.is_empty() && self.client_ca_file.is_empty() {
            return Ok(None);
        }
        install_crypto_provider();
        let mut config = ServerTlsConfig::new().identity(identity(
            "APP_TLS__",
            &self.cert_file,
            &self.key_file,
        )?);
        if !self.client_ca_file.is_empty() {
            config = config.client_ca_root(Certificate::from_pem(read(
                "APP_TLS__CLIENT_CA_FILE",
                &self.client_ca_file,
            )?));
        }
        Ok(Some(config))
    }
}

impl ClientTls {
    /// The client configuration for `url`; `None` for an `http` URL with
    /// no file set (plaintext).
    ///
    /// `prefix` names the settings in errors, e.g. `APP_USER_SERVICE__TLS__`.
    ///
    /// # Errors
    ///
    /// A file that cannot be read, a certificate without its key, or TLS
    /// files for an `http` URL (which would silently go unencrypted).
    pub fn config(&self, url: &str, prefix: &str) -> Result<Option<ClientTlsConfig>, StartError> {
        let https = url.starts_with("https://");
        let files =
            !(self.ca_file.is_empty() && self.cert_file.is_empty() && self.key_file.is_empty());
        if !https {
            return if files {
                Err(StartError::setting(
                    format!("{prefix}*"),
                    format!("is set but {url} is not https"),
                ))
            } else {
                Ok(None)
            };
        }
        install_crypto_provider();
        let mut config = ClientTlsConfig::new();
        config = if self.ca_file.is_empty() {
            config.with_native_roots()
        } else {
            config.ca_certificate(Certificate::from_pem(read(
                &format!("{prefix}CA_FILE"),
                &self.ca_file,
            )?))
        };
        if !(self.cert_file.is_empty() && self.key_file.is_empty()) {
            config = config.identity(identity(prefix, &self.cert_file, &self.key_file)?);
        }
        if !self.domain.is_empty() {
            config = config.domain_name(self.domain.clone());
        }
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_unless_configured_and_no_silent_downgrade() {
        assert!(ServerTls::default().config().expect("plain").is_none());
        assert!(
            ClientTls::default()
                .config("http://127.0.0.1:1", "X__")
                .expect("plain")
                .is_none()
        );
        let with_ca = ClientTls {
            ca_file: "/nonexistent/ca.pem".to_owned(),
            ..ClientTls::default()
        };
        let error = with_ca
            .config("http://user-service:50051", "APP_USER_SERVICE__TLS__")
            .expect_err("TLS files with an http URL");
        assert!(error.to_string().contains("is not https"), "{error}");
        let error = with_ca
            .config("https://user-service:50051", "APP_USER_SERVICE__TLS__")
            .expect_err("missing file");
        assert!(
            error
                .to_string()
                .contains("APP_USER_SERVICE__TLS__CA_FILE /nonexistent/ca.pem"),
            "{error}"
        );
        let half = ServerTls {
            cert_file: "/x/cert.pem".to_owned(),
            ..ServerTls::default()
        };
        assert!(
            half.config()
                .expect_err("cert without key")
                .to_string()
                .contains("must be set together")
        );
    }
}
