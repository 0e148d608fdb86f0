//! TLS settings: the client-facing listener (rustls, ALPN h2, optional mTLS) and the connections
//! to tls:// backends. Also parses `--backend` URLs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::pool::{BackendAddress, BackendTls};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {reason}")]
    Certs { path: PathBuf, reason: String },
    #[error("cannot read a private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
    #[error("invalid backend URL {url:?}: {reason} (expected tcp://host:port or tls://host:port[?ca=..&cert=..&key=..&server-name=..])")]
    BackendUrl { url: String, reason: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Certs {
            path: path.into(),
            reason: e.to_string(),
        })?
        .collect();
    let certs = certs.map_err(|e| TlsError::Certs {
        path: path.into(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Certs {
            path: path.into(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.into(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store.add(cert).map_err(|e| TlsError::Certs {
            path: path.into(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

/// The listener's TLS settings. ALPN offers `h2`; a client that offers no ALPN at all (buildx's
/// remote driver) is still served HTTP/2, since this port only speaks HTTP/2.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| {
            TlsError::Config(format!(
                "certificate {} / key {}: {e}",
                cert.display(),
                key.display()
            ))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// TLS files for reaching tls:// backends.
#[derive(Debug, Clone, Default)]
pub struct BackendTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
}

impl BackendTlsFiles {
    /// Whether any backend TLS setting was given.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.server_name.is_some()
    }

    /// The client configuration for backends. A CA is required: backends are private daemons,
    /// never signed by a public authority.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let ca = self.ca.as_deref().ok_or_else(|| {
            TlsError::Config("tls:// backends need a CA (--backend-tls-ca or ?ca=)".into())
        })?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| {
                    TlsError::Config(format!("client certificate {}: {e}", cert.display()))
                })?,
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(TlsError::Config(
                    "a backend client certificate needs both cert and key".into(),
                ))
            }
        };
        // buildkitd (grpc-go) speaks HTTP/2 only and selects h2.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// TLS settings for a backend at `host`.
    pub fn for_host(&self, host: &str) -> Result<BackendTls, TlsError> {
        let name = self.server_name.clone().unwrap_or_else(|| host.to_owned());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| TlsError::Config(format!("server name {name:?}: {e}")))?;
        Ok(BackendTls {
            client_config: self.client_config()?,
            server_name,
        })
    }
}

/// Parses a `--backend` URL; `defaults` supplies TLS files not given in the URL's query.
pub fn parse_backend_url(
    url: &str,
    defaults: &BackendTlsFiles,
) -> Result<BackendAddress, TlsError> {
    let bad = |reason: &str| TlsError::BackendUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let tls = match uri.scheme_str() {
        Some("tcp") => false,
        Some("tls") => true,
        Some(other) => return Err(bad(&format!("unsupported scheme {other:?}"))),
        None => return Err(bad("missing scheme")),
    };
    let authority = uri.authority().ok_or_else(|| bad("missing host:port"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().ok_or_else(|| bad("missing port"))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad("a path is not allowed"));
    }
    let mut files = defaults.clone();
    if let Some(query) = uri.query() {
        if !tls {
            return Err(bad("TLS options need the tls:// scheme"));
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad("query options are key=value"))?;
            match key {
                "ca" => files.ca = Some(value.into()),
                "cert" => files.cert = Some(value.into()),
                "key" => files.key = Some(value.into()),
                "server-name" => files.server_name = Some(value.into()),
                other => return Err(bad(&format!("unknown option {other:?}"))),
            }
        }
    }
    let tls = if tls {
        Some(files.for_host(&host)?)
    } else {
        None
    };
    Ok(BackendAddress { host, port, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_backend_urls_parse() {
        let a =
            parse_backend_url("tcp://10.0.0.5:1234", &BackendTlsFiles::default()).expect("parse");
        assert_eq!(
            (a.host.as_str(), a.port, a.tls.is_none()),
            ("10.0.0.5", 1234, true)
        );
        assert_eq!(a.to_string(), "tcp://10.0.0.5:1234");
        let v6 = parse_backend_url("tcp://[::1]:1234", &BackendTlsFiles::default()).expect("parse");
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "tcp://[::1]:1234");
    }

    #[test]
    fn bad_backend_urls_say_what_is_wrong() {
        for (url, needle) in [
            ("http://a:1", "unsupported scheme"),
            ("tcp://a", "missing port"),
            ("tls://a:1", "need a CA"),
            ("tcp://a:1?ca=/x", "tls:// scheme"),
            ("tcp://a:1/path", "path"),
        ] {
            let err = parse_backend_url(url, &BackendTlsFiles::default())
                .expect_err(url)
                .to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
    }
}
