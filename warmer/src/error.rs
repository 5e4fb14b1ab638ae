//! What can stop a warming pass before it fetches anything: a sitemap that cannot be
//! read (unreachable, not 200, too large, not a sitemap, an index too big) or a
//! variation that is not a header. Each error names the sitemap or the input it is
//! about; fetch failures during a pass are counted in the pass's summary instead.

use crate::fetch::FetchError;
use crate::sitemap::SitemapError;

/// Why the URLs to warm could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{url}: {error}")]
    Fetch { url: String, error: FetchError },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{url}: {error}")]
    Sitemap { url: String, error: SitemapError },
    #[error("sitemap index lists more than {0} sitemaps")]
    TooManySitemaps(usize),
    #[error("sitemap index lists more than {0} URLs")]
    TooManyUrls(usize),
    #[error("{0}: nested sitemap indexes are not followed")]
    NestedIndex(String),
    #[error("{0}")]
    Variation(String),
}
