//! Where shoppers come from: each logged request's client network (IPv4 /24, IPv6 /48)
//! with hits and misses, reported every interval as `ClientNets` so the coordinator can
//! geolocate them (per-country traffic).
//!
//! The client is the first `X-Forwarded-For` address: varnishd sets it to the peer's
//! address when a client sends none, and a TLS terminator or load balancer in front puts
//! the shopper's address there. Only networks leave the edge, never a full address.
//! Memory is bounded: at most [`MAX_TRACKED`] networks per interval; requests from
//! networks beyond that, or with an unreadable address, count as "other".

use std::collections::HashMap;
use std::net::IpAddr;

use proto::edge::{ClientNets, NetCount};

/// Networks tracked in one interval.
pub const MAX_TRACKED: usize = 8192;

/// The network `ip` belongs to, as reported: /24 for IPv4, /48 for IPv6 (an IPv4-mapped
/// IPv6 address counts as IPv4).
pub fn network_of(ip: IpAddr) -> (IpAddr, u8) {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (IpAddr::from([o[0], o[1], o[2], 0]), 24)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => network_of(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                (IpAddr::from([s[0], s[1], s[2], 0, 0, 0, 0, 0]), 48)
            }
        },
    }
}

/// The client address in an `X-Forwarded-For` value: its first entry, with an optional
/// port (`1.2.3.4:5678`, `[2001:db8::1]:443`).
pub fn first_forwarded(xff: &str) -> Option<IpAddr> {
    let first = xff.split(',').next()?.trim();
    if let Ok(ip) = first.parse() {
        return Some(ip);
    }
    if let Some(rest) = first.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    first.rsplit_once(':')?.0.parse().ok()
}

/// One interval's counts.
#[derive(Debug, Default)]
pub struct ClientCounter {
    nets: HashMap<(IpAddr, u8), (u64, u64)>,
    other: (u64, u64),
}

impl ClientCounter {
    /// Counts one request from the client in `xff` (varnishncsa prints `-` for none).
    pub fn add(&mut self, xff: &str, hit: bool) {
        let slot = match first_forwarded(xff).map(network_of) {
            Some(net) if self.nets.len() < MAX_TRACKED || self.nets.contains_key(&net) => {
                self.nets.entry(net).or_default()
            }
            _ => &mut self.other,
        };
        if hit {
            slot.0 += 1;
        } else {
            slot.1 += 1;
        }
    }

    /// The interval's report (the `n` busiest networks, the rest as other), and a fresh
    /// start; `None` when nothing was counted.
    pub fn take(&mut self, n: usize) -> Option<ClientNets> {
        let nets = std::mem::take(&mut self.nets);
        let (mut other_hits, mut other_misses) = std::mem::take(&mut self.other);
        if nets.is_empty() && other_hits + other_misses == 0 {
            return None;
        }
        let mut all: Vec<((IpAddr, u8), (u64, u64))> = nets.into_iter().collect();
        all.sort_unstable_by(|a, b| {
            (b.1 .0 + b.1 .1)
                .cmp(&(a.1 .0 + a.1 .1))
                .then(a.0.cmp(&b.0))
        });
        for (_, (h, m)) in all.iter().skip(n) {
            other_hits += h;
            other_misses += m;
        }
        all.truncate(n);
        Some(ClientNets {
            nets: all
                .into_iter()
                .map(|((net, prefix_len), (hits, misses))| NetCount {
                    net: net.to_string(),
                    prefix_len: u32::from(prefix_len),
                    hits,
                    misses,
                })
                .collect(),
            other_hits,
            other_misses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_networks() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(network_of(ip("81.2.69.142")), (ip("81.2.69.0"), 24));
        assert_eq!(network_of(ip("2001:218:1:2::5")), (ip("2001:218:1::"), 48));
        assert_eq!(network_of(ip("::ffff:81.2.69.142")), (ip("81.2.69.0"), 24));
        assert_eq!(
            first_forwarded("81.2.69.142, 127.0.0.1"),
            Some(ip("81.2.69.142"))
        );
        assert_eq!(first_forwarded("81.2.69.142:5555"), Some(ip("81.2.69.142")));
        assert_eq!(
            first_forwarded("[2001:db8::1]:443, 10.0.0.1"),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(first_forwarded("-"), None);
        assert_eq!(first_forwarded("unknown, 1.2.3.4"), None);
    }

    #[test]
    fn reports_the_busiest_and_bounds_memory() {
        let mut c = ClientCounter::default();
        for _ in 0..5 {
            c.add("81.2.69.142", true);
        }
        c.add("81.2.69.7", false);
        c.add("175.16.199.1", false);
        c.add("-", true);
        let r = c.take(1).expect("report");
        assert_eq!(r.nets.len(), 1);
        assert_eq!(
            (r.nets[0].net.as_str(), r.nets[0].prefix_len),
            ("81.2.69.0", 24)
        );
        assert_eq!((r.nets[0].hits, r.nets[0].misses), (5, 1));
        assert_eq!((r.other_hits, r.other_misses), (1, 1));
        assert!(c.take(10).is_none(), "reset after a report");

        for i in 0..(MAX_TRACKED as u32 + 100) {
            let ip = std::net::Ipv4Addr::from(i << 8);
            c.add(&ip.to_string(), false);
        }
        assert_eq!(c.nets.len(), MAX_TRACKED);
        assert_eq!(c.other.1, 100);
    }
}
