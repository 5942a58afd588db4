//! Addresses, address blocks and listeners: parsing CIDR lists from
//! settings, judging an address by the IPv4 address it really reaches, and
//! binding the gRPC and admin listeners.

use std::net::{IpAddr, Ipv4Addr};

/// The addresses of a setting that lists several, separated by commas (the
/// replicas of a service, the nodes of a NATS cluster), blanks dropped.
#[must_use]
pub fn urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// One channel over `endpoints`: the endpoint itself when there is one,
/// else balanced over all (power of two choices) that accept connections.
/// A balanced channel's endpoints are probed every [`PROBE_EVERY`]: one
/// that refuses or does not answer leaves the balancer, so calls stop going
/// to a dead replica (tonic's own balancer keeps it and fails its share of
/// calls with UNAVAILABLE), and it comes back when it accepts again. When
/// none does, all stay in, so calls fail at once rather than wait.
/// Connects lazily either way; needs a Tokio runtime when balancing.
#[must_use]
pub fn channel(endpoints: Vec<tonic::transport::Endpoint>) -> tonic::transport::Channel {
    if let [endpoint] = endpoints.as_slice() {
        return endpoint.connect_lazy();
    }
    let (channel, changes) = tonic::transport::Channel::balance_channel(endpoints.len().max(1));
    tokio::spawn(watch(endpoints, changes));
    channel
}

/// How often a balanced channel's endpoints are probed.
pub const PROBE_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

type Changes =
    tokio::sync::mpsc::Sender<tonic::transport::channel::Change<usize, tonic::transport::Endpoint>>;

/// Keeps the balancer's endpoints to those that accept a TCP connection;
/// ends when the channel is dropped.
async fn watch(endpoints: Vec<tonic::transport::Endpoint>, changes: Changes) {
    use tonic::transport::channel::Change;
    let mut inside = vec![false; endpoints.len()];
    let mut first = true;
    loop {
        let mut reachable = Vec::with_capacity(endpoints.len());
        for endpoint in &endpoints {
            reachable.push(first || accepts(endpoint.uri()).await);
        }
        first = false;
        // None reachable: keep every endpoint in, so calls fail fast.
        let wanted = if reachable.iter().any(|r| *r) {
            reachable
        } else {
            vec![true; endpoints.len()]
        };
        for (key, (endpoint, want)) in endpoints.iter().zip(wanted).enumerate() {
            if want == inside[key] {
                continue;
            }
            let change = if want {
                Change::Insert(key, endpoint.clone())
            } else {
                tracing::debug!(uri = %endpoint.uri(), "endpoint does not accept connections; calls go to the others");
                Change::Remove(key)
            };
            if changes.send(change).await.is_err() {
                return;
            }
            inside[key] = want;
        }
        if changes.is_closed() {
            return;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// Whether the endpoint's host accepts a TCP connection within a second.
async fn accepts(uri: &http::Uri) -> bool {
    let Some(host) = uri.host() else {
        return false;
    };
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    matches!(
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::net::TcpStream::connect((host, port)),
        )
        .await,
        Ok(Ok(_))
    )
}

/// An address block, e.g. `127.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    base: IpAddr,
    prefix: u8,
}

impl Network {
    /// `a.b.c.d`, `a.b.c.d/n`, an IPv6 address or block.
    ///
    /// # Errors
    ///
    /// Not an address, or a prefix longer than the address.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (ip, prefix) = text.split_once('/').unwrap_or((text, ""));
        let base: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR block"))?;
        let max = if base.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?} has an invalid prefix length"))?
        };
        Ok(Self { base, prefix })
    }

    /// Whether `ip` (canonical form) is in the block.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.base, canonical(ip)) {
            (IpAddr::V4(base), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(base) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(base), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(base) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4 addresses embedded in IPv6 (`::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`)
/// are judged as the IPv4 address they reach.
#[must_use]
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let segments = v6.segments();
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = segments[6].to_be_bytes();
                let [c, d] = segments[7].to_be_bytes();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// A comma-separated list of blocks from a setting (`127.0.0.0/8,::1`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<Network>);

impl Networks {
    /// Empty text is the empty list.
    ///
    /// # Errors
    ///
    /// The first malformed entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Network::parse)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    /// Whether any block holds `ip`.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }
}

/// Binds a listener, gRPC or admin (port 0 picks a free port; tests use
/// that).
///
/// # Errors
///
/// Fails when the address is taken or invalid.
pub async fn bind(
    addr: &str,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), crate::StartError> {
    let bind_error = |source| crate::StartError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hold_what_their_prefix_says_and_mapped_addresses_count_as_ipv4() {
        let nets = Networks::parse("10.0.0.0/8, ::1,2001:db8::/32").expect("valid");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(nets.contains(ip("10.255.0.1")));
        assert!(nets.contains(ip("::ffff:10.1.2.3")));
        assert!(!nets.contains(ip("11.0.0.1")));
        assert!(nets.contains(ip("::1")));
        assert!(nets.contains(ip("2001:db8:ffff::1")));
        assert!(!nets.contains(ip("2001:db9::1")));
        assert!(Networks::parse("10.0.0.0/33").is_err());
        assert!(Networks::parse("nonsense").is_err());
        assert_eq!(Networks::parse("").expect("empty"), Networks::default());
    }
}
