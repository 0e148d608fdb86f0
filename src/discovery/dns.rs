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
///
/// `Ok` with no addresses means the name has none: the pool has zero backends (a headless
/// Service scaled to zero answers NXDOMAIN or an empty answer). `Err` means the answer is
/// unknown (timeout, SERVFAIL, no server reachable): the source keeps its last set.
pub trait Resolver: Send + Sync + 'static {
    /// Every address of `host`, with `port`.
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// A stub resolver that tells "no such name" and "no records" (an answer: zero addresses) from
/// a failure (timeout, SERVFAIL, REFUSED), which `getaddrinfo` reports alike (hickory-resolver).
/// It asks A and AAAA, honours `/etc/resolv.conf` (name servers, search domains, `ndots`) and
/// `/etc/hosts`, and caches nothing: each lookup is fresh, so a pool scaled to zero is seen at
/// the next `--dns-interval`.
pub struct SystemResolver {
    resolver: hickory_resolver::TokioResolver,
}

impl std::fmt::Debug for SystemResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemResolver")
            .field("name_servers", &self.resolver.config().name_servers())
            .finish()
    }
}

/// A resolver's configuration could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}")]
pub struct ResolverConfigError(#[source] hickory_resolver::ResolveError);

impl SystemResolver {
    /// From `/etc/resolv.conf` and `/etc/hosts`.
    pub fn from_system() -> Result<Self, ResolverConfigError> {
        let mut builder =
            hickory_resolver::TokioResolver::builder_tokio().map_err(ResolverConfigError)?;
        let options = builder.options_mut();
        *options = builder_options(options.clone(), None);
        Ok(Self {
            resolver: builder.build(),
        })
    }

    /// Asks only `servers` over UDP, waiting `timeout` for each answer (one attempt). For tests
    /// and for embedders with their own DNS.
    pub fn with_name_servers(servers: &[SocketAddr], timeout: Duration) -> Self {
        use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
        use hickory_resolver::proto::xfer::Protocol;
        let mut config = ResolverConfig::new();
        for server in servers {
            config.add_name_server(NameServerConfig::new(*server, Protocol::Udp));
        }
        let mut options = builder_options(ResolverOpts::default(), Some(timeout));
        options.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let resolver = hickory_resolver::TokioResolver::builder_with_config(
            config,
            hickory_resolver::name_server::TokioConnectionProvider::default(),
        )
        .with_options(options)
        .build();
        Self { resolver }
    }

    async fn lookup_type(
        &self,
        host: &str,
        record_type: hickory_resolver::proto::rr::RecordType,
    ) -> Answer {
        match self.resolver.lookup(host, record_type).await {
            Ok(lookup) => Answer::Addresses(
                lookup
                    .iter()
                    .filter_map(|rdata| match rdata {
                        hickory_resolver::proto::rr::RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
                        hickory_resolver::proto::rr::RData::AAAA(a) => {
                            Some(std::net::IpAddr::V6(a.0))
                        }
                        _ => None,
                    })
                    .collect(),
            ),
            Err(error) => classify(error),
        }
    }
}

/// Options for discovery: no cache (every interval asks afresh), a bounded wait.
fn builder_options(
    mut options: hickory_resolver::config::ResolverOpts,
    timeout: Option<Duration>,
) -> hickory_resolver::config::ResolverOpts {
    options.cache_size = 0;
    if let Some(timeout) = timeout {
        options.timeout = timeout;
        options.attempts = 1;
    }
    options
}

/// What one query (A or AAAA) said.
enum Answer {
    Addresses(Vec<std::net::IpAddr>),
    /// NXDOMAIN, or NOERROR with no record of the type: the name has no such address.
    None,
    /// No answer that can be trusted: the last set is kept.
    Failed(hickory_resolver::ResolveError),
}

fn classify(error: hickory_resolver::ResolveError) -> Answer {
    use hickory_resolver::proto::op::ResponseCode;
    use hickory_resolver::proto::ProtoErrorKind;
    let empty = error.proto().is_some_and(|proto| {
        matches!(
            proto.kind(),
            ProtoErrorKind::NoRecordsFound {
                response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                ..
            }
        )
    });
    if empty {
        Answer::None
    } else {
        Answer::Failed(error)
    }
}

impl Resolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        use hickory_resolver::proto::rr::RecordType;
        Box::pin(async move {
            // An address is its own answer (e.g. --scaler-peers 10.0.0.7:6000).
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                return Ok(vec![SocketAddr::new(ip, port)]);
            }
            let (v4, v6) = tokio::join!(
                self.lookup_type(host, RecordType::A),
                self.lookup_type(host, RecordType::AAAA)
            );
            // Addresses from either query count (a failed AAAA on an IPv4 cluster loses
            // nothing); zero addresses count only when no query failed.
            let mut addresses = Vec::new();
            let mut failure = None;
            for answer in [v4, v6] {
                match answer {
                    Answer::Addresses(ips) => addresses.extend(ips),
                    Answer::None => {}
                    Answer::Failed(error) => failure = Some(error),
                }
            }
            match failure {
                Some(error) if addresses.is_empty() => Err(io::Error::other(error)),
                _ => Ok(addresses
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect()),
            }
        })
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
    /// With the system's DNS configuration ([`SystemResolver::from_system`]).
    pub fn new(
        target: DnsTarget,
        interval: Duration,
        tls: Option<TlsTemplate>,
    ) -> Result<Self, ResolverConfigError> {
        Ok(Self {
            target,
            interval,
            resolver: Arc::new(SystemResolver::from_system()?),
            tls,
        })
    }
}

/// Resolves every interval; reports the set when it changes (and the first answer, even empty).
/// A name with no addresses (NXDOMAIN, no records) is an empty set; a failed lookup (timeout,
/// SERVFAIL) keeps the last set.
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
