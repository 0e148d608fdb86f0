//! The scaler's flags, and what is wrong with them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::discovery::DnsTarget;
use crate::duration::parse_duration;
use crate::tls::{BackendTlsFiles, TlsError};

/// Scaler flags (flattened into the router's command line).
#[derive(Debug, Clone, clap::Args)]
pub struct ScalerArgs {
    /// Serve KEDA's external scaler gRPC API (externalscaler.ExternalScaler) on this address,
    /// e.g. 0.0.0.0:6000, for an `external-push` or `external` ScaledObject trigger. Off when
    /// not given.
    #[arg(long, value_name = "ADDR", env = "BUILDKIT_ROUTER_SCALER_LISTEN")]
    pub scaler_listen: Option<SocketAddr>,
    /// Serve the scaler API over TLS with this certificate chain (PEM).
    #[arg(
        long,
        requires_all = ["scaler_tls_key", "scaler_listen"],
        env = "BUILDKIT_ROUTER_SCALER_TLS_CERT"
    )]
    pub scaler_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --scaler-tls-cert.
    #[arg(
        long,
        requires = "scaler_tls_cert",
        env = "BUILDKIT_ROUTER_SCALER_TLS_KEY"
    )]
    pub scaler_tls_key: Option<PathBuf>,
    /// Require scaler clients (KEDA, peer replicas) to present certificates signed by this CA.
    #[arg(
        long,
        requires = "scaler_tls_cert",
        env = "BUILDKIT_ROUTER_SCALER_TLS_CLIENT_CA"
    )]
    pub scaler_tls_client_ca: Option<PathBuf>,
    /// After this long with no build queued or running anywhere in the pool, the scaler reports
    /// inactive (StreamIsActive pushes false) and KEDA may scale the pool to zero.
    #[arg(long, value_parser = parse_duration, default_value = "5m", env = "BUILDKIT_ROUTER_SCALE_TO_ZERO_IDLE")]
    pub scale_to_zero_idle: Duration,
    /// The other router replicas' scaler API, as NAME:PORT (comma-separated or repeated),
    /// re-resolved every 5 s: typically a headless Service over the router pods, e.g.
    /// buildkit-router-peers.buildkit.svc.cluster.local:6000. Each replica then counts every
    /// replica's queued builds (itself is recognised and skipped).
    #[arg(
        long,
        value_name = "NAME:PORT",
        value_delimiter = ',',
        requires = "scaler_listen",
        env = "BUILDKIT_ROUTER_SCALER_PEERS"
    )]
    pub scaler_peers: Vec<String>,
    /// CA (PEM) that signs the peers' scaler certificates; needed with --scaler-tls-cert and
    /// --scaler-peers. With --scaler-tls-client-ca, peers are shown --scaler-tls-cert.
    #[arg(
        long,
        requires = "scaler_peers",
        env = "BUILDKIT_ROUTER_SCALER_PEER_CA"
    )]
    pub scaler_peer_ca: Option<PathBuf>,
    /// Server name verified on the peers' certificates (default: the NAME of --scaler-peers).
    #[arg(
        long,
        requires = "scaler_peers",
        env = "BUILDKIT_ROUTER_SCALER_PEER_SERVER_NAME"
    )]
    pub scaler_peer_server_name: Option<String>,
}

/// Why the scaler cannot start. Each names the flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error("--scaler-peers {value:?} is not NAME:PORT: {reason}")]
    InvalidPeer { value: String, reason: String },
    #[error("--scaler-peers with a TLS scaler (--scaler-tls-cert) needs --scaler-peer-ca, the CA that signs the peers' scaler certificates")]
    PeerCaMissing,
    #[error("--scaler-peers: {0}")]
    PeerResolver(#[from] crate::discovery::ResolverConfigError),
    #[error("scaler TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen for the scaler API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The TLS files peers are reached with.
pub(super) fn peer_tls_files(
    args: &ScalerArgs,
    host: &str,
) -> Result<BackendTlsFiles, ScalerError> {
    let ca = args
        .scaler_peer_ca
        .clone()
        .ok_or(ScalerError::PeerCaMissing)?;
    let (cert, key) = match args.scaler_tls_client_ca {
        Some(_) => (args.scaler_tls_cert.clone(), args.scaler_tls_key.clone()),
        None => (None, None),
    };
    Ok(BackendTlsFiles {
        ca: Some(ca),
        cert,
        key,
        server_name: Some(
            args.scaler_peer_server_name
                .clone()
                .unwrap_or_else(|| host.to_owned()),
        ),
    })
}

/// `--scaler-peers` entries.
pub(super) fn parse_peers(args: &ScalerArgs) -> Result<Vec<DnsTarget>, ScalerError> {
    args.scaler_peers
        .iter()
        .map(|value| {
            value
                .parse::<DnsTarget>()
                .map_err(|reason| ScalerError::InvalidPeer {
                    value: value.clone(),
                    reason,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The scaler's flags alone (the router's command line flattens them the same way).
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        scaler: ScalerArgs,
    }

    fn args(extra: &[&str]) -> ScalerArgs {
        let mut all = vec!["buildkit-router"];
        all.extend_from_slice(extra);
        Flags::try_parse_from(all).expect("flags parse").scaler
    }

    #[test]
    fn defaults_leave_the_scaler_off_with_five_minutes_of_idle() {
        let a = args(&[]);
        assert!(a.scaler_listen.is_none());
        assert_eq!(a.scale_to_zero_idle, Duration::from_secs(300));
        assert!(a.scaler_peers.is_empty());
    }

    #[test]
    fn scaler_flags_without_a_scaler_are_refused() {
        let mut none = vec!["buildkit-router", "--scaler-peers", "peers.svc:6000"];
        assert!(
            Flags::try_parse_from(&none).is_err(),
            "peers without --scaler-listen"
        );
        none.extend(["--scaler-listen", "0.0.0.0:6000"]);
        assert!(Flags::try_parse_from(&none).is_ok());
    }

    #[test]
    fn bad_peers_name_the_flag_and_the_reason() {
        let a = args(&[
            "--scaler-listen",
            "0.0.0.0:6000",
            "--scaler-peers",
            "buildkit-router-peers.buildkit.svc",
        ]);
        let err = parse_peers(&a).unwrap_err().to_string();
        assert!(
            err.contains("--scaler-peers") && err.contains(":port"),
            "{err}"
        );
        let a = args(&[
            "--scaler-listen",
            "0.0.0.0:6000",
            "--scaler-peers",
            "a.svc:6000,10.0.0.7:6000",
        ]);
        assert_eq!(parse_peers(&a).unwrap().len(), 2);
    }

    #[test]
    fn tls_peers_need_a_ca() {
        let a = args(&[
            "--scaler-listen",
            "0.0.0.0:6000",
            "--scaler-tls-cert",
            "/c.pem",
            "--scaler-tls-key",
            "/k.pem",
            "--scaler-peers",
            "peers.svc:6000",
        ]);
        assert!(matches!(
            peer_tls_files(&a, "peers.svc"),
            Err(ScalerError::PeerCaMissing)
        ));
        let a = args(&[
            "--scaler-listen",
            "0.0.0.0:6000",
            "--scaler-tls-cert",
            "/c.pem",
            "--scaler-tls-key",
            "/k.pem",
            "--scaler-tls-client-ca",
            "/ca.pem",
            "--scaler-peer-ca",
            "/ca.pem",
            "--scaler-peers",
            "peers.svc:6000",
        ]);
        let files = peer_tls_files(&a, "peers.svc").unwrap();
        assert_eq!(files.server_name.as_deref(), Some("peers.svc"));
        assert!(
            files.cert.is_some(),
            "with mTLS, peers present the scaler's certificate"
        );
    }
}
