//! Who the client is: the peer address, or, when the peer is a trusted proxy, the right-most
//! address of the forwarding header the proxies write (`X-Forwarded-For` by default, or
//! `Forwarded`: `SEGUE_FORWARDED_HEADER`) that is not a trusted proxy. Only that header is
//! read (a proxy that appends to one passes the other through from the client), and a header
//! sent by an untrusted peer is ignored, so spoofing one changes nothing.

use std::net::IpAddr;
use std::str::FromStr;

use actix_web::http::header::HeaderMap;
use ipnet::IpNet;

/// Which header the trusted proxies write the client's address into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum ForwardedHeader {
    #[default]
    #[serde(rename = "x-forwarded-for")]
    XForwardedFor,
    #[serde(rename = "forwarded")]
    Forwarded,
}

/// The proxies whose forwarding header is believed (`SEGUE_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Comma-separated addresses or CIDRs (`10.0.0.0/8, 127.0.0.1, ::1`); empty trusts none.
    pub fn parse(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                IpNet::from_str(entry)
                    .or_else(|_| IpAddr::from_str(entry).map(IpNet::from))
                    .map_err(|_| format!("{entry:?} is not an address or a CIDR like 10.0.0.0/8"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// The client's address for a request from `peer` with `headers`.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &TrustedProxies,
    header: ForwardedHeader,
) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.contains(peer) {
        return peer;
    }
    let hops = forwarded_for(headers, header);
    // From the nearest hop outwards: the first address no trusted proxy vouches for.
    let mut nearest = peer;
    for hop in hops.iter().rev() {
        let Some(ip) = hop.map(canonical) else {
            // An address we cannot read (`unknown`, an obfuscated name): the last proxy we
            // trust is as far as we can see.
            return nearest;
        };
        if !trusted.contains(ip) {
            return ip;
        }
        nearest = ip;
    }
    nearest
}

/// `::ffff:1.2.3.4` is `1.2.3.4`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The forwarded-for chain of `header`, client first. `None` for an entry that is not an
/// address. Lines are read byte by byte (a stray non-ASCII byte a client put in its part must
/// not hide the part the proxy appended).
fn forwarded_for(headers: &HeaderMap, header: ForwardedHeader) -> Vec<Option<IpAddr>> {
    let name = match header {
        ForwardedHeader::XForwardedFor => "x-forwarded-for",
        ForwardedHeader::Forwarded => "forwarded",
    };
    let lines: Vec<String> = headers
        .get_all(name)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .collect();
    let elements = lines.iter().flat_map(|line| line.split(','));
    match header {
        ForwardedHeader::XForwardedFor => elements.map(node).collect(),
        // Every element stands for one hop, with or without a `for=`.
        ForwardedHeader::Forwarded => elements
            .map(|element| {
                element.split(';').find_map(|pair| {
                    let (name, value) = pair.trim().split_once('=')?;
                    name.trim()
                        .eq_ignore_ascii_case("for")
                        .then(|| node(value))?
                })
            })
            .collect(),
    }
}

/// One node: `192.0.2.60`, `"[2001:db8::1]:4711"`, `192.0.2.60:80`, `2001:db8::1`.
fn node(raw: &str) -> Option<IpAddr> {
    let text = raw.trim().trim_matches('"');
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// What limits and blocks count by: an IPv4 address, or an IPv6 address's /64 (one host
/// usually holds a whole /64, so counting single addresses would let it rotate freely).
pub fn address_key(ip: IpAddr) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            format!(
                "{:x}:{:x}:{:x}:{:x}::/64",
                segments[0], segments[1], segments[2], segments[3]
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let spoofed = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=198.51.100.1"),
        ]);
        for header in [ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded] {
            let from_outside = client_ip(ip("192.0.2.7"), &spoofed, &trusted, header);
            assert_eq!(from_outside, ip("192.0.2.7"));
            let none = TrustedProxies::default();
            assert_eq!(
                client_ip(ip("10.0.0.1"), &spoofed, &none, header),
                ip("10.0.0.1")
            );
        }
    }

    #[test]
    fn behind_trusted_proxies_the_right_most_untrusted_hop_is_the_client() {
        let trusted = TrustedProxies::parse("10.0.0.0/8, 127.0.0.1").unwrap();
        let (xff, fwd) = (ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded);
        let proxy = ip("10.0.0.1");
        // The client prepended a lie; the proxies appended what they saw.
        let chain = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9, 10.1.1.1")]);
        assert_eq!(client_ip(proxy, &chain, &trusted, xff), ip("203.0.113.9"));
        let split = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            client_ip(ip("127.0.0.1"), &split, &trusted, xff),
            ip("203.0.113.9")
        );
        let forwarded = headers(&[(
            "forwarded",
            "for=1.2.3.4, for=\"[2001:db8::1]:4711\";proto=https, for=10.2.2.2;by=10.0.0.1",
        )]);
        assert_eq!(
            client_ip(proxy, &forwarded, &trusted, fwd),
            ip("2001:db8::1")
        );
        // Only the configured header counts: a client's own Forwarded passed on by an
        // X-Forwarded-For proxy changes nothing (the review's evasion).
        let both = headers(&[
            ("forwarded", "for=198.51.100.2:80"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(client_ip(proxy, &both, &trusted, xff), ip("203.0.113.9"));
        assert_eq!(client_ip(proxy, &both, &trusted, fwd), ip("198.51.100.2"));
        // A Forwarded element without `for=` is a hop we cannot read.
        let no_for = headers(&[("forwarded", "for=203.0.113.9, proto=https")]);
        assert_eq!(client_ip(proxy, &no_for, &trusted, fwd), proxy);
        // No header, or only trusted hops: the nearest proxy's view is all there is.
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted, xff), proxy);
        let inside = headers(&[("x-forwarded-for", "10.9.9.9")]);
        assert_eq!(client_ip(proxy, &inside, &trusted, xff), ip("10.9.9.9"));
        let unreadable = headers(&[("x-forwarded-for", "203.0.113.9, unknown, 10.3.3.3")]);
        assert_eq!(client_ip(proxy, &unreadable, &trusted, xff), ip("10.3.3.3"));
        // A client's non-ASCII bytes do not hide what the proxy appended.
        let mut dirty = HeaderMap::new();
        dirty.append(
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.8").unwrap(),
        );
        assert_eq!(client_ip(proxy, &dirty, &trusted, xff), ip("203.0.113.8"));
    }

    #[test]
    fn proxies_parse_as_addresses_or_cidrs() {
        let trusted = TrustedProxies::parse(" 10.0.0.0/8 ,::1, 192.168.1.1 ,").unwrap();
        assert!(trusted.contains(ip("10.200.0.1")));
        assert!(trusted.contains(ip("::1")));
        assert!(trusted.contains(ip("192.168.1.1")));
        assert!(!trusted.contains(ip("192.168.1.2")));
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("proxy.internal").is_err());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        assert_eq!(address_key(ip("2001:db8:1:2:3:4:5:6")), "2001:db8:1:2::/64");
        assert_eq!(address_key(ip("2001:db8:1:2:ffff::1")), "2001:db8:1:2::/64");
        assert_eq!(address_key(ip("::ffff:192.0.2.1")), "192.0.2.1");
        assert_eq!(address_key(ip("192.0.2.1")), "192.0.2.1");
    }
}
