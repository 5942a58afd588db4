//! Where webhooks may be delivered: public addresses only, so a user cannot
//! make the service post to the cloud metadata endpoint, the cluster's
//! private network or the services' own admin ports (SSRF), nor scan them.
//!
//! The address is checked twice: when a webhook is registered (IP literals,
//! in every form URL parsing normalises — decimal, hex, IPv4-mapped IPv6 —
//! and names that are internal by definition) and at every send, on the
//! addresses the name resolves to *at that moment* (a custom resolver of
//! the HTTP client, so the checked address is the one connected to: DNS
//! rebinding gains nothing). Redirects are not followed. Private networks a
//! deployment does want (the local stack's and the tests' loopback
//! receivers) are allowed explicitly with `APP_WEBHOOK_ALLOWED_NETWORKS`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use platform::net::{Networks, canonical};

/// Whether `ip` is on the public internet (not loopback, private, link
/// local, shared, documentation, multicast, reserved or unspecified).
#[must_use]
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    const BLOCKED: [(u32, u8); 15] = [
        (0x0000_0000, 8),  // 0.0.0.0/8 "this network"
        (0x0a00_0000, 8),  // 10.0.0.0/8
        (0x6440_0000, 10), // 100.64.0.0/10 shared (CGNAT)
        (0x7f00_0000, 8),  // 127.0.0.0/8 loopback
        (0xa9fe_0000, 16), // 169.254.0.0/16 link local (cloud metadata)
        (0xac10_0000, 12), // 172.16.0.0/12
        (0xc000_0000, 24), // 192.0.0.0/24 protocol assignments
        (0xc000_0200, 24), // 192.0.2.0/24 documentation
        (0xc0a8_0000, 16), // 192.168.0.0/16
        (0xc612_0000, 15), // 198.18.0.0/15 benchmarking
        (0xc633_6400, 24), // 198.51.100.0/24 documentation
        (0xcb00_7100, 24), // 203.0.113.0/24 documentation
        (0xe000_0000, 4),  // 224.0.0.0/4 multicast
        (0xf000_0000, 4),  // 240.0.0.0/4 reserved, broadcast
        (0xc058_6300, 24), // 192.88.99.0/24 6to4 relay
    ];
    let ip = u32::from(ip);
    !BLOCKED.iter().any(|(base, prefix)| {
        let mask = u32::MAX << (32 - u32::from(*prefix));
        ip & mask == base & mask
    })
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || first & 0xfe00 == 0xfc00 // fc00::/7 unique local
        || first & 0xffc0 == 0xfe80 // fe80::/10 link local
        || first & 0xffc0 == 0xfec0 // fec0::/10 site local (deprecated)
        || first & 0xff00 == 0xff00 // ff00::/8 multicast
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || ip.segments()[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible (deprecated)
}

/// Names that are internal by definition (never public).
fn internal_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host.ends_with(".localhost")
        || host.ends_with(".internal")
        || host.ends_with(".local")
        || !host.contains('.')
}

/// The egress policy of webhook deliveries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Egress {
    allowed: Networks,
}

impl Egress {
    /// `allowed`: comma-separated addresses or CIDR blocks that may be
    /// reached although not public (e.g. `127.0.0.0/8,::1`); empty: none.
    ///
    /// # Errors
    ///
    /// A malformed entry.
    pub fn new(allowed: &str) -> Result<Self, String> {
        Ok(Self {
            allowed: Networks::parse(allowed)?,
        })
    }

    /// Whether a delivery may connect to `ip`.
    #[must_use]
    pub fn permits(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allowed.contains(ip)
    }

    /// Checks a webhook URL when it is registered.
    ///
    /// # Errors
    ///
    /// Why the target is refused, fit for a field violation.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), &'static str> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) if !self.permits(IpAddr::V4(ip)) => Err(
                "must be a public address (private, loopback and link-local targets are refused)",
            ),
            Some(url::Host::Ipv6(ip)) if !self.permits(IpAddr::V6(ip)) => Err(
                "must be a public address (private, loopback and link-local targets are refused)",
            ),
            Some(url::Host::Domain(name)) if internal_name(name) => {
                Err("must be a public host name (internal names are refused)")
            }
            None => Err("must be an absolute http(s) URL"),
            _ => Ok(()),
        }
    }

    /// Checks a URL again just before sending: IP literals here (names are
    /// checked on their resolved addresses by [`Resolver`]).
    pub(crate) fn check_send(&self, url: &reqwest::Url) -> Result<(), String> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            Some(url::Host::Domain(name)) if internal_name(name) => {
                return Err(format!("{name} is an internal name"));
            }
            _ => return Ok(()),
        };
        if self.permits(ip) {
            Ok(())
        } else {
            Err(format!("{ip} is not a public address"))
        }
    }
}

/// The HTTP client's resolver: resolves with the system resolver and keeps
/// only addresses the policy permits, so the connection goes to a checked
/// address or nowhere.
#[derive(Debug, Clone)]
pub(crate) struct Resolver(pub(crate) Arc<Egress>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = Arc::clone(&self.0);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|addr| egress.permits(addr.ip()))
                .collect();
            if permitted.is_empty() {
                return Err(format!(
                    "{host} resolves only to addresses webhooks may not reach ({})",
                    resolved
                        .iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(permitted.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> reqwest::Url {
        reqwest::Url::parse(text).expect("a URL")
    }

    #[test]
    fn private_loopback_link_local_and_metadata_targets_are_refused() {
        let egress = Egress::default();
        for target in [
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://192.168.1.1/",
            "http://172.16.0.1/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://0.0.0.0/",
            "http://2852039166/",          // 169.254.169.254, decimal
            "http://0xa9fea9fe/",          // the same, hex
            "http://0251.0376.0251.0376/", // the same, octal
            "http://[::ffff:a9fe:a9fe]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://127.0.0.1:9092/metrics",
            "http://[::1]:9093/",
            "http://localhost:9091/",
            "http://metadata.google.internal/",
            "http://printer.local/",
            "http://intranet/",
        ] {
            assert!(
                egress.check_url(&url(target)).is_err(),
                "{target} was accepted"
            );
        }
    }

    #[test]
    fn public_targets_are_accepted() {
        let egress = Egress::default();
        for target in [
            "https://hooks.example.com/shop",
            "http://93.184.216.34/",
            "https://[2606:2800:220:1:248:1893:25c8:1946]/",
        ] {
            assert_eq!(egress.check_url(&url(target)), Ok(()), "{target}");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_what_they_name() {
        let egress = Egress::new("127.0.0.0/8, ::1").expect("valid");
        assert!(egress.check_url(&url("http://127.0.0.1:8080/hook")).is_ok());
        assert!(egress.check_url(&url("http://[::1]:8080/hook")).is_ok());
        assert!(egress.check_url(&url("http://10.0.0.1/")).is_err());
        assert!(egress.check_url(&url("http://169.254.169.254/")).is_err());
        assert!(Egress::new("10.0.0.0/33").is_err());
        assert!(Egress::new("not-an-ip").is_err());
    }

    #[tokio::test]
    async fn names_are_judged_by_what_they_resolve_to_at_send_time() {
        use reqwest::dns::Resolve as _;
        // `localhost` resolves to loopback: refused unless allowed.
        let strict = Resolver(Arc::new(Egress::default()));
        let name: reqwest::dns::Name = "localhost".parse().expect("a name");
        assert!(strict.resolve(name).await.is_err());
        let open = Resolver(Arc::new(Egress::new("127.0.0.0/8,::1").expect("valid")));
        let name: reqwest::dns::Name = "localhost".parse().expect("a name");
        let addrs: Vec<_> = open.resolve(name).await.expect("allowed").collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
