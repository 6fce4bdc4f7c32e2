//! Where webhooks may go: every address a target host resolves to must be
//! a public unicast address (no loopback, private, link-local, shared,
//! multicast, documentation or reserved ranges, including IPv4 embedded in
//! IPv6), unless `notifications.allow_private_webhook_targets` is set. The
//! check runs when an endpoint is registered and again inside the HTTP
//! client's resolver on every delivery, so a DNS answer that changes later
//! (rebinding) cannot reach an internal address.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// True when `ip` is not a public unicast address.
pub fn is_forbidden_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 shared (CGNAT)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || o[0] >= 240 // reserved
}

fn forbidden_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let s = ip.segments();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7 unique local
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10 link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10 site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96) and 6to4
        // (2002::/16) carry an IPv4 address that may be internal.
        || (s[..6] == [0, 0, 0, 0, 0, 0])
        || (s[0] == 0x64 && s[1] == 0xff9b && forbidden_v4(embedded_v4(s[6], s[7])))
        || (s[0] == 0x2002 && forbidden_v4(embedded_v4(s[1], s[2])))
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
}

/// Why a target was refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("`{host}` resolves to {ip}, a private, loopback or otherwise non-public address; webhooks only go to public addresses (notifications.allow_private_webhook_targets)")]
    Forbidden { host: String, ip: IpAddr },
    #[error("cannot resolve `{host}`: {message}")]
    Unresolvable { host: String, message: String },
}

/// Resolves `host` and checks every address; returns them all.
pub async fn resolve_checked(
    host: &str,
    port: u16,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, TargetError> {
    let host_trimmed = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = if let Ok(ip) = host_trimmed.parse::<IpAddr>() {
        vec![SocketAddr::new(ip, port)]
    } else {
        let lookup = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((host_trimmed, port)),
        )
        .await
        .map_err(|_| TargetError::Unresolvable {
            host: host.into(),
            message: "DNS lookup timed out".into(),
        })?
        .map_err(|e| TargetError::Unresolvable {
            host: host.into(),
            message: e.to_string(),
        })?;
        lookup.collect()
    };
    if addrs.is_empty() {
        return Err(TargetError::Unresolvable {
            host: host.into(),
            message: "no addresses".into(),
        });
    }
    if !allow_private {
        if let Some(bad) = addrs.iter().find(|a| is_forbidden_address(a.ip())) {
            return Err(TargetError::Forbidden {
                host: host.into(),
                ip: bad.ip(),
            });
        }
    }
    Ok(addrs)
}

/// The webhook client's resolver: refuses a name when any of its addresses
/// is forbidden. (IP literals never reach a resolver; deliveries check
/// them with [`resolve_checked`] first.)
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow = self.allow_private;
        Box::pin(async move {
            let addrs = resolve_checked(name.as_str(), 0, allow).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(s: &str) -> bool {
        is_forbidden_address(s.parse().unwrap())
    }

    #[test]
    fn internal_addresses_are_forbidden_and_public_ones_allowed() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "::127.0.0.1",
        ] {
            assert!(bad(s), "{s} should be forbidden");
        }
        for s in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!bad(s), "{s} should be allowed");
        }
    }

    #[tokio::test]
    async fn localhost_names_and_literals_are_refused_unless_allowed() {
        assert!(matches!(
            resolve_checked("localhost", 80, false).await,
            Err(TargetError::Forbidden { .. })
        ));
        assert!(matches!(
            resolve_checked("[::1]", 80, false).await,
            Err(TargetError::Forbidden { .. })
        ));
        assert!(resolve_checked("127.0.0.1", 80, true).await.is_ok());
    }
}
