//! Certificates made by the real `openssl` tool, and a TLS-terminating proxy
//! for peers that only speak plaintext (the OTLP test collector).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use tokio::net::{TcpListener, TcpStream};

/// A CA, a server certificate for `localhost` / `127.0.0.1` and a client
/// certificate signed by it, plus an unrelated CA, as PEM files.
#[derive(Debug)]
pub struct Certs {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| anyhow::anyhow!("running openssl (apt-get install openssl): {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

fn ca(dir: &Path, name: &str) -> anyhow::Result<()> {
    let (key, cert, subject) = (
        format!("{name}.key"),
        format!("{name}.pem"),
        format!("/CN={name}"),
    );
    let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
    args.extend(EC);
    args.extend([
        "-keyout",
        &key,
        "-out",
        &cert,
        "-subj",
        &subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &args)
}

fn leaf(dir: &Path, name: &str, extensions: &str) -> anyhow::Result<()> {
    let (key, csr, cert, ext, subject) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
        format!("/CN={name}"),
    );
    std::fs::write(dir.join(&ext), extensions)?;
    let mut args = vec!["req", "-nodes"];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
    openssl(dir, &args)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ],
    )
}

impl Certs {
    /// # Errors
    ///
    /// When `openssl` is missing or fails.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path();
        ca(path, "ca")?;
        ca(path, "other-ca")?;
        leaf(
            path,
            "server",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        leaf(path, "client", "extendedKeyUsage=clientAuth\n")?;
        Ok(Self {
            ca: path.join("ca.pem"),
            server_cert: path.join("server.pem"),
            server_key: path.join("server.key"),
            client_cert: path.join("client.pem"),
            client_key: path.join("client.key"),
            other_ca: path.join("other-ca.pem"),
            _dir: dir,
        })
    }

    /// Server settings presenting the server certificate and, with
    /// `mutual`, requiring client certificates from the CA.
    #[must_use]
    pub fn server(&self, mutual: bool) -> platform::tls::ServerTls {
        platform::tls::ServerTls {
            cert_file: self.server_cert.display().to_string(),
            key_file: self.server_key.display().to_string(),
            client_ca_file: if mutual {
                self.ca.display().to_string()
            } else {
                String::new()
            },
        }
    }

    /// Client settings trusting the CA and presenting the client certificate.
    #[must_use]
    pub fn client(&self) -> platform::tls::ClientTls {
        platform::tls::ClientTls {
            ca_file: self.ca.display().to_string(),
            cert_file: self.client_cert.display().to_string(),
            key_file: self.client_key.display().to_string(),
            domain: String::new(),
        }
    }
}

/// Accepts TLS (HTTP/2 by ALPN) with the server certificate and forwards
/// the plaintext to `upstream`. Stops when dropped.
#[derive(Debug)]
pub struct TlsTerminator {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsTerminator {
    /// # Errors
    ///
    /// Unreadable certificate files or no free port.
    pub async fn start(certs: &Certs, upstream: SocketAddr) -> anyhow::Result<Self> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
        platform::tls::install_crypto_provider();
        let chain =
            CertificateDer::pem_file_iter(&certs.server_cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&certs.server_key)?;
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.task.abort();
    }
}
