//! The PowerDNS remote backend, HTTP connector: pdns (`launch=remote`,
//! `remote-connection-string=http:url=http://HOST:PORT/dns`) asks, we answer from the
//! routing decision.
//!
//! pdns 4.7 calls `GET /dns/METHOD/ARG...` with each argument percent-encoded (dots too:
//! `/dns/lookup/www%2eshop%2eexample%2e/ANY`) and the client in headers
//! (`X-RemoteBackend-Real-Remote`: the EDNS client subnet when it has one and
//! `edns-subnet-processing=yes`, else the resolver's address as `/32` or `/128`;
//! `X-RemoteBackend-Remote`: the resolver). Every answer is JSON with `result`:
//!
//! - `getAllDomains`: the one zone (pdns's zone cache refuses every query without it);
//! - `getDomainInfo/ZONE`, `getAllDomainMetadata/ZONE` (`{}`), `getDomainMetadata`
//!   (`[]`);
//! - `lookup/QNAME/QTYPE` (pdns asks `ANY` and filters): for the apex SOA (all seven
//!   fields) and NS, and for each name in `[dns] names` the A and AAAA records of the
//!   region chosen for the client, with `scopeMask` set to the client subnet's prefix
//!   length so that pdns and resolvers never hand one subnet's answer to another;
//! - anything else: `{"result": false}` (not implemented, which pdns accepts).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::any;
use axum::{Json, Router};
use ipnet::IpNet;
use serde_json::{json, Value};

use super::Geo;

/// What the backend answers with.
#[derive(Clone)]
struct Zone {
    geo: Arc<Geo>,
    /// Lower case, with the final dot.
    apex: String,
    /// Fully qualified names answered with a region's addresses.
    names: Vec<String>,
    nameservers: Vec<String>,
    hostmaster: String,
    ttl: u32,
    zone_ttl: u32,
    serial: u32,
}

fn fqdn(name: &str, apex: &str) -> String {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name == "@" {
        apex.to_owned()
    } else if format!("{name}.") == apex
        || name.ends_with(&format!(".{}", apex.trim_end_matches('.')))
    {
        format!("{name}.")
    } else {
        format!("{name}.{apex}")
    }
}

/// The backend's routes (`/dns/...`); `None` when `[dns]` is not configured.
pub fn router(geo: Arc<Geo>) -> Option<Router> {
    let config = geo.dns_config()?.clone();
    Some(
        Router::new()
            .route("/dns/*call", any(call))
            // Anything else still gets a JSON body with `result`, as pdns expects.
            .fallback(|| async { Json(json!({ "result": false })) })
            .with_state(Zone::new(geo, &config)),
    )
}

impl Zone {
    fn new(geo: Arc<Geo>, config: &super::DnsConfig) -> Zone {
        let apex = format!(
            "{}.",
            config.zone.trim_end_matches('.').to_ascii_lowercase()
        );
        let names = config.names.iter().map(|n| fqdn(n, &apex)).collect();
        let nameservers = if config.nameservers.is_empty() {
            vec![format!("ns1.{apex}")]
        } else {
            config.nameservers.iter().map(|n| fqdn(n, &apex)).collect()
        };
        let hostmaster = config
            .hostmaster
            .as_deref()
            .map_or_else(|| format!("hostmaster.{apex}"), |h| fqdn(h, &apex));
        let serial = u32::try_from(crate::clock::now_ms() / 1000).unwrap_or(1);
        Zone {
            geo,
            apex,
            names,
            nameservers,
            hostmaster,
            ttl: config.ttl,
            zone_ttl: config.zone_ttl,
            serial,
        }
    }
}

async fn call(
    State(zone): State<Zone>,
    Path(call): Path<String>,
    headers: HeaderMap,
) -> Json<Value> {
    // axum has decoded the path; pdns encodes each argument, so `/` only separates.
    let mut parts = call.split('/');
    let method = parts.next().unwrap_or("");
    let args: Vec<&str> = parts.collect();
    let result = match (method, args.as_slice()) {
        ("lookup", [qname, qtype, ..]) => lookup(&zone, qname, qtype, &headers),
        ("getAllDomains", _) => json!([domain_info(&zone)]),
        ("getDomainInfo", [name, ..]) if same_name(name, &zone.apex) => domain_info(&zone),
        ("getAllDomainMetadata", [name, ..]) if same_name(name, &zone.apex) => json!({}),
        ("getDomainMetadata", [name, ..]) if same_name(name, &zone.apex) => json!([]),
        _ => json!(false),
    };
    Json(json!({ "result": result }))
}

fn same_name(a: &str, apex: &str) -> bool {
    a.trim_end_matches('.')
        .eq_ignore_ascii_case(apex.trim_end_matches('.'))
}

fn domain_info(zone: &Zone) -> Value {
    json!({
        "id": 1,
        "zone": zone.apex,
        "kind": "native",
        "serial": zone.serial,
        "notified_serial": zone.serial,
        "last_check": 0,
        "masters": [],
    })
}

/// The client pdns is asking for: the real-remote subnet, else the remote address.
/// Returns the address to route and the prefix length to scope the answer to.
pub fn client_of(headers: &HeaderMap) -> Option<(IpAddr, u8)> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    for name in ["x-remotebackend-real-remote", "x-remotebackend-remote"] {
        let Some(raw) = header(name) else { continue };
        // "fe80::1%eth0/64" from broken set-ups: drop the zone index.
        let (addr, prefix) = match raw.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (raw, None),
        };
        let addr = addr.split('%').next().unwrap_or(addr);
        let Ok(ip) = addr.parse::<IpAddr>() else {
            continue;
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match prefix.map(str::parse::<u8>) {
            Some(Ok(p)) if p <= max => p,
            Some(_) => continue,
            None => max,
        };
        let net = IpNet::new(ip, len).ok()?;
        return Some((net.network(), len));
    }
    None
}

fn lookup(zone: &Zone, qname: &str, qtype: &str, headers: &HeaderMap) -> Value {
    let qname = format!("{}.", qname.trim_end_matches('.').to_ascii_lowercase());
    let qtype = qtype.to_ascii_uppercase();
    let wants = |t: &str| qtype == "ANY" || qtype == t;
    let mut out = Vec::new();
    if qname == zone.apex {
        if wants("SOA") {
            out.push(json!({
                "qtype": "SOA",
                "qname": zone.apex,
                "content": format!(
                    "{} {} {} 10800 3600 604800 {}",
                    zone.nameservers[0], zone.hostmaster, zone.serial, zone.ttl
                ),
                "ttl": zone.zone_ttl,
                "auth": 1,
            }));
        }
        if wants("NS") {
            for ns in &zone.nameservers {
                out.push(json!({"qtype": "NS", "qname": zone.apex, "content": ns,
                    "ttl": zone.zone_ttl, "auth": 1}));
            }
        }
    }
    if zone.names.contains(&qname) && (wants("A") || wants("AAAA")) {
        let (ip, scope) = client_of(headers).unwrap_or((IpAddr::from([0, 0, 0, 0]), 0));
        let route = zone.geo.route(ip);
        for addr in &route.addresses {
            let t = if addr.is_ipv4() { "A" } else { "AAAA" };
            if wants(t) {
                out.push(
                    json!({"qtype": t, "qname": qname, "content": addr.to_string(),
                    "ttl": zone.ttl, "auth": 1, "scopeMask": scope}),
                );
            }
        }
    }
    Value::Array(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone() -> Zone {
        let geo = Arc::new(super::super::tests::geo(30));
        let facts = super::super::tests::facts(
            &super::super::tests::all_up(),
            &super::super::tests::all_edges(),
        );
        geo.observe(&facts, 0.0);
        let config: super::super::DnsConfig = toml::from_str(
            "listen = \"127.0.0.1:0\"\nzone = \"Shop.Example\"\nnames = [\"www\", \"@\"]",
        )
        .expect("dns config");
        Zone::new(geo, &config)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header value"));
        }
        h
    }

    async fn ask(path: &str, h: &HeaderMap) -> Value {
        let Json(v) = call(State(zone()), Path(path.to_owned()), h.clone()).await;
        v["result"].clone()
    }

    #[test]
    fn the_client_is_the_real_remote_subnet_else_the_remote() {
        let net = |s: &str| s.parse::<IpAddr>().expect("ip");
        let h = headers(&[("x-remotebackend-real-remote", "81.2.69.142/24")]);
        assert_eq!(client_of(&h), Some((net("81.2.69.0"), 24)));
        let h = headers(&[("X-RemoteBackend-Remote", "fe80::1%eth0")]);
        assert_eq!(client_of(&h), Some((net("fe80::1"), 128)));
        let h = headers(&[
            ("x-remotebackend-real-remote", "garbage/99"),
            ("x-remotebackend-remote", "127.0.0.1"),
        ]);
        assert_eq!(client_of(&h), Some((net("127.0.0.1"), 32)));
        assert_eq!(client_of(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn pdns_calls_get_json_results() {
        let h = headers(&[("x-remotebackend-real-remote", "81.2.69.142/32")]);
        let domains = ask("getAllDomains", &h).await;
        assert_eq!(domains[0]["zone"], "shop.example.");
        assert_eq!(
            ask("getDomainInfo/shop.example.", &h).await["kind"],
            "native"
        );
        assert_eq!(ask("getDomainInfo/other.example.", &h).await, json!(false));
        assert_eq!(
            ask("getAllDomainMetadata/shop.example.", &h).await,
            json!({})
        );
        assert_eq!(
            ask("getDomainMetadata/shop.example./PRESIGNED", &h).await,
            json!([])
        );
        assert_eq!(ask("someFutureCall/x", &h).await, json!(false));

        let apex = ask("lookup/SHOP.example./ANY", &h).await;
        let types: Vec<&str> = apex
            .as_array()
            .expect("records")
            .iter()
            .filter_map(|r| r["qtype"].as_str())
            .collect();
        assert_eq!(types, ["SOA", "NS", "A", "AAAA"], "{apex}");
        let soa = &apex[0];
        assert_eq!(soa["qname"], "shop.example.");
        assert_eq!(soa["content"].as_str().expect("soa").split(' ').count(), 7);
        assert!(
            soa.get("scopeMask").is_none(),
            "the SOA does not depend on the client"
        );

        let www = ask("lookup/www.shop.example./ANY", &h).await;
        assert_eq!(www[0]["content"], "203.0.113.10", "London: eu-west");
        assert_eq!(www[0]["scopeMask"], 32);
        assert_eq!(www[1]["qtype"], "AAAA");
        let only_a = ask("lookup/www.shop.example./A", &h).await;
        assert_eq!(only_a.as_array().map(Vec::len), Some(1));
        assert_eq!(ask("lookup/nope.shop.example./ANY", &h).await, json!([]));
        assert_eq!(
            ask("lookup/www.elsewhere.example./ANY", &h).await,
            json!([])
        );
        // No client at all: the default region (us-west), scope 0.
        let anon = ask("lookup/www.shop.example./A", &HeaderMap::new()).await;
        assert_eq!(
            (anon[0]["content"].as_str(), anon[0]["scopeMask"].as_u64()),
            (Some("203.0.113.20"), Some(0))
        );
    }
}
