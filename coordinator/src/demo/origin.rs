//! A Magento-like origin for the demo, the tests and the benchmarks.
//!
//! Every page carries `X-Magento-Tags` and is cacheable for a day, like Magento's full
//! page cache output: `/p/{id}` is a product (`cat_p_{id},cat_p`), `/c/{id}` a category
//! (`cat_c_{id},cat_c`), `/` the home page (`cms_p_1`); `?tags=a,b` overrides the tags
//! and `?pool=x` adds `X-Pool`; `/untagged/...` has no tags. `/health_check.php` and
//! `/sitemap.xml` exist as in Magento. Each response says how many times that URL was
//! rendered (`X-Origin-Render` and the body), and `/__origin/renders?url=...` answers
//! the count, so a test can tell a cache hit from a fresh render.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Render counts per URL (path and query).
#[derive(Debug, Default)]
pub struct Origin {
    renders: DashMap<String, u64>,
}

impl Origin {
    /// How many times `url` (path and query) was rendered.
    pub fn renders(&self, url: &str) -> u64 {
        self.renders.get(url).map(|v| *v).unwrap_or(0)
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

async fn sitemap(headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
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
    for p in 1..=100 {
        add(format!("/p/{p}"));
    }
    xml.push_str("</urlset>\n");
    ([(header::CONTENT_TYPE, "application/xml")], xml).into_response()
}

async fn page(State(origin): State<Arc<Origin>>, uri: Uri) -> Response {
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
