//! Throwaway PKI for TLS and mTLS tests: one CA, a server certificate for `localhost` and
//! 127.0.0.1, and a client certificate, with ready-made rustls configs.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A certificate with its private key, in DER and PEM.
pub struct CertKey {
    pub cert_der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertKey {
    /// The private key as rustls wants it.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// A CA plus a server and a client certificate it signed.
pub struct TestPki {
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    pub server: CertKey,
    pub client: CertKey,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestPki {
    /// Generates a fresh CA, a server certificate (SANs `localhost`, `127.0.0.1`) and a client
    /// certificate (CN `buildctl`).
    pub fn generate() -> TestPki {
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "buildkit-router test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");

        let leaf = |sans: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(sans).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).expect("leaf cert");
            CertKey {
                cert_der: cert.der().clone(),
                key_der: key.serialize_der(),
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }
        };
        let server = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            "buildkitd",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(vec![], "buildctl", ExtendedKeyUsagePurpose::ClientAuth);
        TestPki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            server,
            client,
        }
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add CA");
        roots
    }

    /// A server config for `localhost` offering ALPN `h2` (as buildkitd does), with a client
    /// certificate required when `require_client_cert`.
    pub fn server_config(&self, require_client_cert: bool) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("tls versions");
        let builder = if require_client_cert {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), provider())
                    .build()
                    .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder
            .with_single_cert(vec![self.server.cert_der.clone()], self.server.key())
            .expect("server cert");
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    /// A client config trusting the CA. `alpn_h2`: offer `h2` (buildctl) or no ALPN at all
    /// (the buildx remote driver). `client_cert`: present the client certificate (mTLS).
    pub fn client_config(&self, alpn_h2: bool, client_cert: bool) -> Arc<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_root_certificates(self.roots());
        let mut cfg = if client_cert {
            builder
                .with_client_auth_cert(vec![self.client.cert_der.clone()], self.client.key())
                .expect("client cert")
        } else {
            builder.with_no_client_auth()
        };
        if alpn_h2 {
            cfg.alpn_protocols = vec![b"h2".to_vec()];
        }
        Arc::new(cfg)
    }
}
