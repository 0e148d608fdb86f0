//! DNS discovery: the A/AAAA records of a name (a headless Service), re-resolved on an interval.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{DiscoveryMetrics, SourceSet, TlsTemplate};
use crate::pool::{BackendAddress, EndpointSpec, EndpointState};

const SOURCE: &str = "dns";
/// A lookup that takes longer than this counts as failed (the last set is kept).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves a name to addresses. Injectable so tests need no DNS server.
pub trait Resolver: Send + Sync + 'static {
    /// Every address of `host`, with `port`.
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system resolver (`getaddrinfo` through [`tokio::net::lookup_host`]): honours
/// `/etc/resolv.conf` search domains and `/etc/hosts`, returns A and AAAA records.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// `name:port` of `--dns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub host: String,
    pub port: u16,
}

impl FromStr for DnsTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| "missing :port (buildkitd listens on 1234 by default)".to_string())?;
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            Some(_) => return Err(format!("{host:?} is not an IPv6 address in brackets")),
            None if host.contains(':') => {
                return Err(format!(
                    "put the IPv6 address {host:?} in brackets: [{host}]:port"
                ))
            }
            None if host.is_empty() => return Err("empty name".into()),
            None => host,
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a port number 1-65535"))?;
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

/// The `--dns` source.
pub struct DnsSource {
    pub target: DnsTarget,
    pub interval: Duration,
    pub resolver: Arc<dyn Resolver>,
    pub tls: Option<TlsTemplate>,
}

impl DnsSource {
    /// With the system resolver.
    pub fn new(target: DnsTarget, interval: Duration, tls: Option<TlsTemplate>) -> Self {
        Self {
            target,
            interval,
            resolver: Arc::new(SystemResolver),
            tls,
        }
    }
}

/// Resolves every interval; reports the set when it changes (and the first answer, even empty).
/// A failed lookup keeps the last set.
pub(crate) async fn run(
    source: DnsSource,
    index: usize,
    tx: mpsc::Sender<SourceSet>,
    metrics: DiscoveryMetrics,
) {
    let DnsTarget { host, port } = &source.target;
    let mut ticker = tokio::time::interval(source.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<BTreeSet<SocketAddr>> = None;
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            _ = ticker.tick() => {}
        }
        let result =
            match tokio::time::timeout(LOOKUP_TIMEOUT, source.resolver.lookup(host, *port)).await {
                Ok(result) => result,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {LOOKUP_TIMEOUT:?}"),
                )),
            };
        let addresses: BTreeSet<SocketAddr> = match result {
            Ok(addresses) => addresses
                .into_iter()
                .map(|a| SocketAddr::new(a.ip().to_canonical(), *port))
                .collect(),
            Err(error) => {
                metrics.error(SOURCE);
                let kept = last.as_ref().map_or(0, BTreeSet::len);
                warn!(source = SOURCE, name = %host, %error, kept, "DNS lookup failed; keeping the last known backends");
                continue;
            }
        };
        if last.as_ref() == Some(&addresses) {
            debug!(source = SOURCE, name = %host, backends = addresses.len(), "DNS answer unchanged");
            continue;
        }
        if addresses.is_empty() {
            warn!(source = SOURCE, name = %host, "DNS name has no addresses: no backends");
        } else {
            info!(source = SOURCE, name = %host, backends = addresses.len(), "DNS answer changed");
        }
        let specs = addresses
            .iter()
            .map(|addr| spec(*addr, source.tls.as_ref()))
            .collect();
        last = Some(addresses);
        if tx.send(SourceSet { index, specs }).await.is_err() {
            return;
        }
    }
}

/// One backend per address; identity `ip:port` (`[v6]:port`).
fn spec(addr: SocketAddr, tls: Option<&TlsTemplate>) -> EndpointSpec {
    let host = addr.ip().to_string();
    let mut address = BackendAddress::tcp(host.clone(), addr.port());
    address.tls = tls.map(|t| t.for_endpoint(None, &host));
    EndpointSpec {
        identity: addr.to_string(),
        address,
        state: EndpointState::Ready,
        zone: None,
        node: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "buildkitd.ci.svc:1234".parse::<DnsTarget>().unwrap(),
            DnsTarget {
                host: "buildkitd.ci.svc".into(),
                port: 1234
            }
        );
        assert_eq!(
            "[::1]:1234".parse::<DnsTarget>().unwrap(),
            DnsTarget {
                host: "::1".into(),
                port: 1234
            }
        );
        assert!("buildkitd".parse::<DnsTarget>().is_err());
        assert!("buildkitd:0".parse::<DnsTarget>().is_err());
        assert!(":1234".parse::<DnsTarget>().is_err());
        assert!("::1:1234".parse::<DnsTarget>().is_err());
    }

    #[test]
    fn identities_are_ip_and_port() {
        let v4 = spec("10.1.2.3:1234".parse().unwrap(), None);
        assert_eq!(v4.identity, "10.1.2.3:1234");
        assert_eq!(v4.address.to_string(), "tcp://10.1.2.3:1234");
        let v6 = spec("[fd00::1]:1234".parse().unwrap(), None);
        assert_eq!(v6.identity, "[fd00::1]:1234");
        assert_eq!(v6.address.host, "fd00::1");
    }
}
