//! The warm signature: how a warm request proves it knows the warm secret without
//! carrying it.
//!
//! Varnish writes every request header it receives into its shared-memory log, which
//! anyone in the varnish group can read, so a secret sent as a header is a secret shown to
//! all of them, replayable for ever. Instead each warm request carries
//! `X-Warm-Sig: <unix seconds>.<hex SHA-256>` over the secret, the request target (path
//! and query, exactly as sent) and that time. Stock varnish has no HMAC, but it has one
//! keyed hash: `req.hash` is the SHA-256 of every `hash_data()` string, each followed by a
//! NUL byte. The project's VCL (`edge-agent/vcl/main.vcl`, its `X-Warm-Check` subs)
//! hashes the same three strings in one extra pass and compares, and accepts the time only
//! within [`WINDOW_S`] of its own clock: a value read from the log is worth nothing 30 s
//! later, nor for another URL. (No NUL byte can be part of a URL or header, so the
//! construction cannot be length-extended into another valid request.)
//!
//! A satellite region's varnish cannot sign (it has no hash in its backend side), so its
//! fetches from its shield carry [`tier_token`] instead: a value derived from the secret
//! that only lets the shield show the pages' tags, which the satellite's own log shows
//! anyway; it cannot force a miss, and the warm secret is not derivable from it.

use sha2::{Digest, Sha256};

/// The request header that carries the signature.
pub const HEADER: &str = "X-Warm-Sig";

/// How old a signature the VCL accepts (it also accepts one up to 5 s in the future).
pub const WINDOW_S: u64 = 30;

/// `<unix_s>.<hex>` for a request to `target` (path and query) signed at `unix_s`.
pub fn signature(secret: &str, target: &str, unix_s: u64) -> String {
    let ts = unix_s.to_string();
    let mut h = Sha256::new();
    for part in [secret, target, &ts] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    format!("{ts}.{}", hex::encode(h.finalize()))
}

/// [`signature`] at the current wall-clock time.
pub fn signature_now(secret: &str, target: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    signature(secret, target, now)
}

/// What a satellite's varnish sends its shield (`${warm_tier_token}` in the VCL).
pub fn tier_token(secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"varnish-coordinator tier token\0");
    h.update(secret.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_what_varnish_computes() {
        // `hash_data("s3cret"); hash_data("/p/1"); hash_data("123");` in varnishd 7.1,
        // read back as blob.encode(HEX, blob=req.hash).
        assert_eq!(
            signature("s3cret", "/p/1", 123),
            "123.2adcdb1928c6bc6f967ed84872c8ab590e2dacb75af0029949e02026941f4a10"
        );
    }

    #[test]
    fn differs_by_url_time_and_secret_and_hides_the_secret() {
        let a = signature("secret-a", "/p/1", 1000);
        assert_ne!(a, signature("secret-a", "/p/2", 1000));
        assert_ne!(a, signature("secret-a", "/p/1", 1001));
        assert_ne!(a, signature("secret-b", "/p/1", 1000));
        assert!(!a.contains("secret"));
        let tier = tier_token("secret-a");
        assert_eq!(tier.len(), 64);
        assert_ne!(tier, tier_token("secret-b"));
        assert!(!tier.contains("secret"));
    }
}
