//! Popular URLs: each agent reports its edge's most requested URLs (from varnishncsa);
//! summed per region they are what a `top` job warms.
//!
//! Only the latest report of each edge counts, at most `MAX_TOP_PER_EDGE` URLs, each a
//! plain `host/path` (no control character or space, at most 2 KiB); a region not
//! configured is ignored.

use std::collections::{BTreeMap, HashMap};

use proto::edge::TopUrls;

use super::Warm;

/// Most popular URLs kept per edge.
const MAX_TOP_PER_EDGE: usize = 10_000;

/// The latest popular-URL report per region and edge.
#[derive(Debug, Default)]
pub(super) struct Popular {
    top: BTreeMap<String, BTreeMap<String, Vec<(String, u64)>>>,
}

impl Warm {
    /// An edge's popular URLs.
    pub fn on_top(&self, edge: &str, region: &str, top: TopUrls) {
        let list: Vec<(String, u64)> = top
            .urls
            .into_iter()
            .take(MAX_TOP_PER_EDGE)
            .filter(|u| u.url.len() <= 2048 && !u.url.chars().any(|c| c.is_control() || c == ' '))
            .map(|u| (u.url, u.count))
            .collect();
        if !self.regions.iter().any(|r| r == region) {
            return;
        }
        self.popular()
            .top
            .entry(region.to_owned())
            .or_default()
            .insert(edge.to_owned(), list);
    }

    /// The `n` most requested URLs of each region (counts summed over its edges), as
    /// absolute URLs.
    pub fn top(&self, regions: &[String], n: usize) -> BTreeMap<String, Vec<(String, u64)>> {
        let popular = self.popular();
        regions
            .iter()
            .map(|r| {
                let mut sum: HashMap<&str, u64> = HashMap::new();
                for list in popular.top.get(r).into_iter().flat_map(|e| e.values()) {
                    for (u, c) in list {
                        *sum.entry(u.as_str()).or_default() += c;
                    }
                }
                let mut all: Vec<(String, u64)> = sum
                    .into_iter()
                    .filter_map(|(u, c)| absolute(u, self.config.host.as_deref()).map(|u| (u, c)))
                    .collect();
                all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                all.truncate(n);
                (r.clone(), all)
            })
            .collect()
    }
}

/// `host/path` as varnishncsa prints it → `http://host/path` (`-` host: the configured
/// one).
fn absolute(url: &str, default_host: Option<&str>) -> Option<String> {
    let slash = url.find('/')?;
    let (host, path) = url.split_at(slash);
    let host = if host.is_empty() || host == "-" {
        default_host?
    } else {
        host
    };
    Some(format!("http://{host}{path}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::edges::EdgeRegistry;
    use crate::warm::WarmConfig;

    #[test]
    fn popular_urls_are_summed_per_region() {
        let dir = tempfile::tempdir().unwrap();
        let config = WarmConfig {
            host: Some("shop.test".into()),
            ..WarmConfig::default()
        };
        let regions: Vec<String> = vec!["eu".into(), "us".into(), "ap".into()];
        let edges = Arc::new(EdgeRegistry::default());
        let warm = Warm::open(config, "tok".into(), regions.clone(), dir.path(), edges).unwrap();
        let top = |v: &[(&str, u64)]| TopUrls {
            urls: v
                .iter()
                .map(|(u, c)| proto::edge::UrlCount {
                    url: u.to_string(),
                    count: *c,
                })
                .collect(),
        };
        warm.on_top(
            "eu-1",
            "eu",
            top(&[("shop.test/p/1", 5), ("shop.test/p/2", 3)]),
        );
        warm.on_top("eu-2", "eu", top(&[("shop.test/p/2", 4), ("-/p/3", 1)]));
        warm.on_top("x", "mars", top(&[("a/b", 1)]));
        let t = warm.top(&regions, 2);
        assert_eq!(
            t["eu"],
            vec![
                ("http://shop.test/p/2".to_owned(), 7),
                ("http://shop.test/p/1".to_owned(), 5)
            ]
        );
        assert!(t["us"].is_empty());
        assert_eq!(absolute("-/p/3", None), None);
    }
}
