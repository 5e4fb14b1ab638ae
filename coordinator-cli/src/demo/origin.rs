//! A Magento-like origin for the demo, the tests and the benchmarks.
//!
//! Every page carries `X-Magento-Tags` and is cacheable for a day, like Magento's full
//! page cache output: `/p/{id}` is a product (`cat_p_{id},cat_p`), `/c/{id}` a category
//! (`cat_c_{id},cat_c`), `/` the home page (`cms_p_1`); `?tags=a,b` overrides the tags
//! and `?pool=x` adds `X-Pool`; `/untagged/...` has no tags. `/health_check.php` and
//! `/sitemap.xml` exist as in Magento. Each response says how many times that URL was
//! rendered (`X-Origin-Render` and the body), and `/__origin/renders?url=...` answers
//! the count, so a test can tell a cache hit from a fresh render.
//!
//! For warming: `/sitemap.xml?products=N` lists `/`, ten categories and N products (100
//! by default); `/sitemap_index.xml` is an index of two gzipped halves
//! (`/sitemap-{1,2}.xml.gz`), as Magento writes one per store view. Knobs a test turns:
//! a render delay (a slow origin) and a share of 503 answers (an origin in trouble);
//! every page request is time-stamped so a test can measure the load it got.

use daemon::sync::Recover;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The readiness path the process helpers request (not counted as page load).
const READY: &str = "/__ready";

/// Render counts per URL (path and query).
#[derive(Debug, Default)]
pub struct Origin {
    renders: DashMap<String, u64>,
    /// When each page request arrived (renders and 503s).
    requests: Mutex<Vec<Instant>>,
    delay_ms: AtomicU64,
    /// Every Nth page request answers 503 (0: never).
    fail_every: AtomicU64,
    seen: AtomicU64,
}

impl Origin {
    /// How many times `url` (path and query) was rendered.
    pub fn renders(&self, url: &str) -> u64 {
        self.renders.get(url).map(|v| *v).unwrap_or(0)
    }

    /// Successful renders of every page together (not the test helpers' `/__ready`).
    pub fn total_renders(&self) -> u64 {
        self.renders
            .iter()
            .filter(|e| e.key() != READY)
            .map(|e| *e.value())
            .sum()
    }

    /// Arrival times of every page request so far.
    pub fn request_times(&self) -> Vec<Instant> {
        self.requests.locked().clone()
    }

    /// Each page takes this long before its first byte.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Every `n`th page request answers 503 (0: none).
    pub fn set_fail_every(&self, n: u64) {
        self.fail_every.store(n, Ordering::Relaxed);
    }
}

/// Serves the origin on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    origin: Arc<Origin>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/health_check.php", get(|| async { "OK" }))
        .route("/sitemap.xml", get(sitemap))
        .route("/sitemap_index.xml", get(sitemap_index))
        .route("/__origin/renders", get(renders))
        .fallback(page)
        .with_state(origin);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn renders(
    State(origin): State<Arc<Origin>>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let url = q.get("url").cloned().unwrap_or_default();
    axum::Json(serde_json::json!({ "url": url, "renders": origin.renders(&url) })).into_response()
}

fn host_of(headers: &HeaderMap) -> &str {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
}

/// `/sitemap_index.xml?parts=N&per=M`: N gzipped sitemaps of M products each (2 x 50 by
/// default), as Magento writes one per store view.
async fn sitemap_index(
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let host = host_of(&headers);
    let num = |k: &str, d: u64| q.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    let (parts, per) = (num("parts", 2).min(1000), num("per", 50).min(50_000));
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<sitemapindex xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n");
    for k in 1..=parts {
        xml.push_str(&format!(
            "  <sitemap><loc>http://{host}/sitemap-{k}.xml.gz?per={per}</loc></sitemap>\n"
        ));
    }
    xml.push_str("</sitemapindex>\n");
    ([(header::CONTENT_TYPE, "application/xml")], xml).into_response()
}

/// `/sitemap-{k}.xml.gz?per=M`: products `(k-1)*M+1 ..= k*M`, gzipped.
fn sitemap_part(headers: &HeaderMap, uri: &Uri) -> Option<Response> {
    let k: u64 = uri
        .path()
        .strip_prefix("/sitemap-")?
        .strip_suffix(".xml.gz")?
        .parse()
        .ok()?;
    let per: u64 = uri
        .query()
        .and_then(|q| q.strip_prefix("per="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
        .min(50_000);
    let range = (k.saturating_sub(1) * per + 1)..=(k * per);
    let host = host_of(headers);
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n");
    for p in range {
        xml.push_str(&format!("  <url><loc>http://{host}/p/{p}</loc></url>\n"));
    }
    xml.push_str("</urlset>\n");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let body = gz.write_all(xml.as_bytes()).and_then(|_| gz.finish());
    Some(match body {
        Ok(b) => ([(header::CONTENT_TYPE, "application/x-gzip")], b).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    })
}

async fn sitemap(
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let host = host_of(&headers);
    let products: u32 = q
        .get("products")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100)
        .min(1_000_000);
    let mut xml = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n",
    );
    let mut add = |path: String| {
        xml.push_str(&format!("  <url><loc>http://{host}{path}</loc><changefreq>daily</changefreq><priority>0.5</priority></url>\n"));
    };
    add("/".into());
    for c in 1..=10 {
        add(format!("/c/{c}"));
    }
    for p in 1..=products {
        add(format!("/p/{p}"));
    }
    xml.push_str("</urlset>\n");
    ([(header::CONTENT_TYPE, "application/xml")], xml).into_response()
}

async fn page(State(origin): State<Arc<Origin>>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(r) = sitemap_part(&headers, &uri) {
        return r;
    }
    let url = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let path = uri.path();
    let query: std::collections::HashMap<String, String> = uri
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let tags = if let Some(t) = query.get("tags") {
        Some(t.clone())
    } else if path.starts_with("/untagged") {
        None
    } else if let Some(id) = path.strip_prefix("/p/") {
        Some(format!("cat_p_{id},cat_p"))
    } else if let Some(id) = path.strip_prefix("/c/") {
        Some(format!("cat_c_{id},cat_c"))
    } else if path == "/" {
        Some("cms_p_1".to_owned())
    } else {
        Some("cms_p_generic".to_owned())
    };
    if path != READY {
        origin.requests.locked().push(Instant::now());
    }
    let delay = origin.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let seen = origin.seen.fetch_add(1, Ordering::Relaxed) + 1;
    let fail_every = origin.fail_every.load(Ordering::Relaxed);
    if fail_every > 0 && seen % fail_every == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "overloaded\n").into_response();
    }
    let n = {
        let mut e = origin.renders.entry(url.clone()).or_insert(0);
        *e += 1;
        *e
    };
    let body = format!("<html><body><h1>{path}</h1><p>render {n}</p></body></html>\n");
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=UTF-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400, s-maxage=86400"),
    );
    if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
        h.insert("x-origin-render", v);
    }
    if let Some(t) = tags.and_then(|t| HeaderValue::from_str(&t).ok()) {
        h.insert("x-magento-tags", t);
    }
    if let Some(p) = query
        .get("pool")
        .and_then(|p| HeaderValue::from_str(p).ok())
    {
        h.insert("x-pool", p);
    }
    resp
}
