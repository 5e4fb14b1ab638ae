//! Which warmed URLs carry which cache tag, so a tag purge can re-warm exactly them.
//!
//! Agents report each URL's `X-Magento-Tags` (the project's VCL shows them only to the
//! warmer's authenticated requests). The index maps tag → URLs, each URL with the
//! *profile* it was warmed with (Host header and variations), because a re-warm must
//! reproduce the cache keys shoppers hit. It is bounded by (tag, URL) pairs: past the
//! bound, the tags indexed longest ago are dropped first (their URLs are then not
//! re-warmed, which costs a miss, never a stale page). It is rebuilt as jobs run and is
//! not persisted.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

/// How a URL was fetched: Host header and variations, as a job holds them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Profile {
    pub host: Option<String>,
    pub variations: Vec<Vec<(String, String)>>,
}

type Entry = (Arc<Profile>, Arc<str>);

/// The bounded tag → URL index.
#[derive(Debug)]
pub struct TagIndex {
    max_pairs: usize,
    pairs: usize,
    tags: HashMap<String, HashSet<Entry>>,
    order: VecDeque<String>,
    profiles: HashSet<Arc<Profile>>,
}

impl TagIndex {
    pub fn new(max_pairs: usize) -> Self {
        TagIndex {
            max_pairs: max_pairs.max(1),
            pairs: 0,
            tags: HashMap::new(),
            order: VecDeque::new(),
            profiles: HashSet::new(),
        }
    }

    /// (tag, URL) pairs held.
    pub fn len(&self) -> usize {
        self.pairs
    }

    pub fn is_empty(&self) -> bool {
        self.pairs == 0
    }

    /// Records that `url`, fetched with `profile`, carries `tags`.
    pub fn add(&mut self, profile: &Profile, url: &str, tags: &[String]) {
        let profile = match self.profiles.get(profile) {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(profile.clone());
                self.profiles.insert(p.clone());
                p
            }
        };
        let url: Arc<str> = Arc::from(url);
        for tag in tags {
            let set = match self.tags.get_mut(tag) {
                Some(s) => s,
                None => {
                    self.order.push_back(tag.clone());
                    self.tags.entry(tag.clone()).or_default()
                }
            };
            if set.insert((profile.clone(), url.clone())) {
                self.pairs += 1;
            }
        }
        while self.pairs > self.max_pairs {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(set) = self.tags.remove(&oldest) {
                self.pairs -= set.len();
            }
        }
        if self.tags.is_empty() {
            self.profiles.clear();
        }
    }

    /// The URLs carrying any of `tags`, grouped by profile, each group sorted.
    pub fn lookup<'a>(
        &self,
        tags: impl IntoIterator<Item = &'a String>,
    ) -> Vec<(Profile, Vec<String>)> {
        let mut groups: HashMap<Arc<Profile>, HashSet<Arc<str>>> = HashMap::new();
        for tag in tags {
            for (p, u) in self.tags.get(tag).into_iter().flatten() {
                groups.entry(p.clone()).or_default().insert(u.clone());
            }
        }
        let mut out: Vec<(Profile, Vec<String>)> = groups
            .into_iter()
            .map(|(p, urls)| {
                let mut urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
                urls.sort();
                ((*p).clone(), urls)
            })
            .collect();
        out.sort_by(|a, b| a.1.cmp(&b.1));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lookup_by_tag_grouped_by_profile() {
        let plain = Profile {
            host: None,
            variations: vec![],
        };
        let de = Profile {
            host: Some("shop".into()),
            variations: vec![vec![("Cookie".into(), "X-Magento-Vary=de".into())]],
        };
        let mut ix = TagIndex::new(100);
        ix.add(&plain, "http://s/p/1", &tags(&["cat_p_1", "cat_p"]));
        ix.add(&plain, "http://s/p/2", &tags(&["cat_p_2", "cat_p"]));
        ix.add(&de, "http://s/p/1", &tags(&["cat_p_1"]));
        ix.add(&plain, "http://s/p/1", &tags(&["cat_p_1"]));
        assert_eq!(ix.len(), 5);
        let got = ix.lookup(&tags(&["cat_p_1"]));
        assert_eq!(got.len(), 2);
        assert!(got
            .iter()
            .all(|(_, u)| u == &vec!["http://s/p/1".to_owned()]));
        let got = ix.lookup(&tags(&["cat_p", "cat_p_2"]));
        assert_eq!(
            got,
            vec![(
                plain.clone(),
                vec!["http://s/p/1".into(), "http://s/p/2".into()]
            )]
        );
        assert!(ix.lookup(&tags(&["nope"])).is_empty());
    }

    #[test]
    fn bounded_dropping_oldest_tags() {
        let p = Profile {
            host: None,
            variations: vec![],
        };
        let mut ix = TagIndex::new(10);
        for i in 0..100 {
            ix.add(
                &p,
                &format!("http://s/p/{i}"),
                &tags(&[&format!("cat_p_{i}"), "all"]),
            );
            assert!(ix.len() <= 10);
        }
        assert!(!ix.lookup(&tags(&["cat_p_99"])).is_empty());
        assert!(ix.lookup(&tags(&["cat_p_0"])).is_empty());
    }
}
