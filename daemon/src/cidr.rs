//! CIDRs in config files and bundles (`[purge] allow` and `trusted_proxies`, the WAF's
//! `cidrs`), read by one rule: an address, `/`, a prefix length, and no host bits set.
//!
//! `10.0.0.1/8` parses as a network in most libraries and silently means `10.0.0.0/8`:
//! an operator who wrote it meant one host or mistyped the length, and either way the
//! list would let in a whole /8 without a word. [`parse`] refuses it and names the
//! network it would have meant. Lists take it through
//! `#[serde(deserialize_with = "daemon::cidr::list")]`, so the loader's error names the
//! key, the element and the value (`purge.allow[1]: "10.0.0.1/8": ...`).

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// `text` as a network, refused with one line when it is not `ADDRESS/LENGTH` or has
/// host bits set (the line does not repeat `text`: the config loader puts the value as
/// written before it).
pub fn parse(text: &str) -> Result<IpNet, String> {
    let net: IpNet = text
        .trim()
        .parse()
        .map_err(|e: ipnet::AddrParseError| e.to_string())?;
    if net.addr() != net.network() {
        return Err(format!(
            "host bits are set: it means {}; write that (or {}/{} for the one address)",
            net.trunc(),
            net.addr(),
            net.max_prefix_len()
        ));
    }
    Ok(net)
}

/// One element of a CIDR list, read through [`parse`].
struct Strict(IpNet);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Refused inside the visitor, so the error carries the element's own place.
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a CIDR such as 10.0.0.0/8")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Strict, E> {
                parse(v).map(Strict).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// `deserialize_with` for a `Vec<IpNet>` field: every element through [`parse`].
pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<Strict>::deserialize(d)?
        .into_iter()
        .map(|s| s.0)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bits_and_garbage_are_refused() {
        assert_eq!(parse("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse("10.0.0.1/32").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(parse("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        let e = parse("10.0.0.1/8").unwrap_err();
        assert!(e.contains("it means 10.0.0.0/8"), "{e}");
        assert!(e.contains("10.0.0.1/32"), "{e}");
        let e = parse("2001:db8::1/32").unwrap_err();
        assert!(e.contains("it means 2001:db8::/32"), "{e}");
        for bad in ["10.0.0.0/33", "300.0.0.0/8", "10.0.0.1", "x"] {
            assert_eq!(
                parse(bad).unwrap_err(),
                "invalid IP address syntax",
                "{bad}"
            );
        }
    }

    #[test]
    fn a_list_names_the_bad_element() {
        #[derive(Debug, Deserialize)]
        struct S {
            #[serde(deserialize_with = "list")]
            allow: Vec<IpNet>,
        }
        let ok: S = crate::config::parse("allow = [\"127.0.0.0/8\", \"::1/128\"]").unwrap();
        assert_eq!(ok.allow.len(), 2);
        let e = crate::config::parse::<S>("allow = [\"127.0.0.0/8\", \"10.0.0.1/8\"]")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("1:25: allow[1]: \"10.0.0.1/8\": host bits are set: it means 10.0.0.0/8"),
            "{e}"
        );
        assert!(e.contains("it means 10.0.0.0/8"), "{e}");
    }
}
