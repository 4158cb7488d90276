//! Which peer addresses the outbound client may connect to.
//!
//! A serverless URL comes from a runner config, which an API caller writes; without a policy
//! it could make torpor fetch a cloud metadata service (credentials) or poke the host's
//! link-local network. Denied by default: link-local (169.254.0.0/16, fe80::/10) and the
//! cloud metadata addresses (169.254.169.254, fd00:ec2::254, 100.100.100.200), each unless
//! a setting allows it; always denied: unspecified (0.0.0.0/8, ::, which Linux treats as
//! loopback), multicast and broadcast, which are no HTTP peer. Loopback and private ranges
//! are allowed by default (apps next to torpor, tests) and can be denied.
//!
//! IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`) and NAT64 (`64:ff9b::/96`)
//! IPv6 addresses are judged by the IPv4 address they carry.
//!
//! The shell applies the policy to the addresses it is about to connect to (after DNS), not
//! to the URL text. Sans-IO.

use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of address an IP is, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    Public,
    Loopback,
    /// RFC 1918, carrier-grade NAT (100.64.0.0/10), unique local (fc00::/7), site-local.
    Private,
    LinkLocal,
    CloudMetadata,
    Unspecified,
    Multicast,
    Broadcast,
}

/// The address policy (settings `serverless.addresses.*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AddressPolicy {
    /// 127.0.0.0/8 and ::1.
    pub allow_loopback: bool,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, fec0::/10.
    pub allow_private: bool,
    /// 169.254.0.0/16 and fe80::/10 (the metadata addresses excepted).
    pub allow_link_local: bool,
    /// 169.254.169.254, fd00:ec2::254, 100.100.100.200.
    pub allow_cloud_metadata: bool,
}

impl Default for AddressPolicy {
    fn default() -> Self {
        AddressPolicy {
            allow_loopback: true,
            allow_private: true,
            allow_link_local: false,
            allow_cloud_metadata: false,
        }
    }
}

impl AddressPolicy {
    /// Whether `ip` may be connected to.
    pub fn allows(&self, ip: IpAddr) -> bool {
        match classify(ip) {
            AddrClass::Public => true,
            AddrClass::Loopback => self.allow_loopback,
            AddrClass::Private => self.allow_private,
            AddrClass::LinkLocal => self.allow_link_local,
            AddrClass::CloudMetadata => self.allow_cloud_metadata,
            AddrClass::Unspecified | AddrClass::Multicast | AddrClass::Broadcast => false,
        }
    }
}

/// The class of `ip`.
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let [a, b, c, d] = ip.octets();
    match (a, b, c, d) {
        (169, 254, 169, 254) | (100, 100, 100, 200) => AddrClass::CloudMetadata,
        (0, ..) => AddrClass::Unspecified,
        (127, ..) => AddrClass::Loopback,
        (169, 254, ..) => AddrClass::LinkLocal,
        (10, ..) | (192, 168, ..) => AddrClass::Private,
        (172, 16..=31, ..) | (100, 64..=127, ..) => AddrClass::Private,
        (224..=239, ..) => AddrClass::Multicast,
        (255, 255, 255, 255) => AddrClass::Broadcast,
        _ => AddrClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    const METADATA: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    let s = ip.segments();
    if ip == METADATA {
        return AddrClass::CloudMetadata;
    }
    if ip.is_unspecified() {
        return AddrClass::Unspecified;
    }
    if ip.is_loopback() {
        return AddrClass::Loopback;
    }
    // IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d and NAT64 64:ff9b::a.b.c.d.
    let embedded = match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0, 0, hi, lo] => Some((hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some((hi, lo)),
        _ => None,
    };
    if let Some((hi, lo)) = embedded {
        return classify_v4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    }
    match s[0] {
        x if x & 0xffc0 == 0xfe80 => AddrClass::LinkLocal,
        x if x & 0xfe00 == 0xfc00 || x & 0xffc0 == 0xfec0 => AddrClass::Private,
        x if x & 0xff00 == 0xff00 => AddrClass::Multicast,
        _ => AddrClass::Public,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(s: &str) -> AddrClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn classes() {
        for (ip, want) in [
            ("169.254.169.254", AddrClass::CloudMetadata),
            ("100.100.100.200", AddrClass::CloudMetadata),
            ("fd00:ec2::254", AddrClass::CloudMetadata),
            ("::ffff:169.254.169.254", AddrClass::CloudMetadata),
            ("::169.254.169.254", AddrClass::CloudMetadata),
            ("64:ff9b::169.254.169.254", AddrClass::CloudMetadata),
            ("169.254.1.1", AddrClass::LinkLocal),
            ("fe80::1", AddrClass::LinkLocal),
            ("febf::1", AddrClass::LinkLocal),
            ("0.0.0.0", AddrClass::Unspecified),
            ("0.1.2.3", AddrClass::Unspecified),
            ("::", AddrClass::Unspecified),
            ("::ffff:0.0.0.0", AddrClass::Unspecified),
            ("127.0.0.1", AddrClass::Loopback),
            ("127.9.9.9", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("10.1.2.3", AddrClass::Private),
            ("172.16.0.1", AddrClass::Private),
            ("172.31.255.255", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("100.64.0.1", AddrClass::Private),
            ("fd12::1", AddrClass::Private),
            ("fc00::1", AddrClass::Private),
            ("224.0.0.1", AddrClass::Multicast),
            ("ff02::1", AddrClass::Multicast),
            ("255.255.255.255", AddrClass::Broadcast),
            ("172.32.0.1", AddrClass::Public),
            ("100.128.0.1", AddrClass::Public),
            ("8.8.8.8", AddrClass::Public),
            ("2606:4700::1111", AddrClass::Public),
        ] {
            assert_eq!(class(ip), want, "{ip}");
        }
    }

    #[test]
    fn default_policy() {
        let p = AddressPolicy::default();
        for ip in ["127.0.0.1", "::1", "10.0.0.1", "fd12::1", "8.8.8.8"] {
            assert!(p.allows(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "100.100.100.200",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!p.allows(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn settings_open_classes_one_by_one() {
        let link_local = AddressPolicy {
            allow_link_local: true,
            ..AddressPolicy::default()
        };
        assert!(link_local.allows("169.254.1.1".parse().unwrap()));
        assert!(!link_local.allows("169.254.169.254".parse().unwrap()));
        let metadata = AddressPolicy {
            allow_cloud_metadata: true,
            ..AddressPolicy::default()
        };
        assert!(metadata.allows("169.254.169.254".parse().unwrap()));
        let closed = AddressPolicy {
            allow_loopback: false,
            allow_private: false,
            ..AddressPolicy::default()
        };
        assert!(!closed.allows("127.0.0.1".parse().unwrap()));
        assert!(!closed.allows("10.0.0.1".parse().unwrap()));
        assert!(closed.allows("8.8.8.8".parse().unwrap()));
    }
}
