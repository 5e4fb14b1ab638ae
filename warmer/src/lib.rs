//! The warming engine: [`sitemap`] (the bounded reader of Magento's sitemaps, fuzzed by
//! `fuzz/` through [`fuzzing`]), [`fetch`] (one timed GET through a varnish), [`pace`]
//! (the AIMD-controlled throttle that keeps the origin within its budget), [`sign`] (the
//! warm signature that proves a request is the warmer's without carrying the secret) and
//! [`engine`]
//! (a paced, concurrency-bounded pass: behind the `warmer` binary, and what the edge
//! agents run for each shard of a coordinator's warm job).

pub mod cli;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod pace;
pub mod sign;
pub mod sitemap;

#[doc(hidden)]
pub mod fuzzing {
    //! Entry point for the `sitemap` fuzz target and the corpus replay test. Property:
    //! parsing never panics, and whatever it returns respects the limits (absolute
    //! http(s) URLs, bounded length and count).

    use crate::sitemap::{parse, Limits, Sitemap};

    pub fn sitemap(data: &[u8]) {
        let limits = Limits {
            max_bytes: 1 << 20,
            max_urls: 1000,
            max_url_bytes: 512,
            max_total_urls: 1000,
        };
        let urls: Vec<String> = match parse(data, &limits) {
            Ok(Sitemap::Index(v)) => v,
            Ok(Sitemap::Pages(p)) => p.into_iter().map(|p| p.loc).collect(),
            Err(_) => return,
        };
        assert!(urls.len() <= limits.max_urls);
        for u in urls {
            assert!(u.len() <= limits.max_url_bytes, "{u:?}");
            assert!(
                u.starts_with("http://") || u.starts_with("https://"),
                "{u:?}"
            );
        }
    }
}

#[cfg(test)]
mod fetch_tests;
