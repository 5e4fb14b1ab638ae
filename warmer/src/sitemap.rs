//! Sitemaps as Magento writes them, read with hard bounds.
//!
//! [`parse`] takes the bytes of one fetched file and returns either a sitemap *index*
//! (`<sitemapindex>`: the per-store-view sitemaps to fetch next) or a *URL set*
//! (`<urlset>`: pages with optional `<priority>`), or, for anything that is not XML, a
//! plain list of URLs, one per line (`#` comments). Gzip (`.xml.gz`) is recognised by its
//! magic bytes and inflated under the same byte limit, so a gzip bomb is an error, not an
//! out-of-memory. Every URL must be absolute `http(s)://` and at most
//! [`Limits::max_url_bytes`]; at most [`Limits::max_urls`] are accepted per file
//! (sitemaps.org allows 50,000). Errors name the line.

use std::io::Read;

use quick_xml::events::Event;
use quick_xml::Reader;

/// Bounds on one sitemap file.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes after decompression.
    pub max_bytes: usize,
    /// URLs in one sitemap file (the sitemaps.org limit is 50,000).
    pub max_urls: usize,
    pub max_url_bytes: usize,
    /// URLs from an index's sitemaps together.
    pub max_total_urls: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 50 * 1024 * 1024,
            max_urls: 50_000,
            max_url_bytes: 2048,
            max_total_urls: 1_000_000,
        }
    }
}

/// One page of a URL set.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub loc: String,
    /// 0.0..=1.0 when given.
    pub priority: Option<f32>,
}

/// What a sitemap file holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Sitemap {
    /// `<sitemapindex>`: more sitemaps to fetch.
    Index(Vec<String>),
    /// `<urlset>` or a plain list.
    Pages(Vec<Page>),
}

/// Why a sitemap cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SitemapError {
    #[error("sitemap is larger than {0} bytes (after decompression)")]
    TooLarge(usize),
    #[error("sitemap has more than {0} URLs")]
    TooManyUrls(usize),
    #[error("gzip data is corrupt: {0}")]
    Gzip(String),
    #[error("line {line}: {message}")]
    Invalid { line: usize, message: String },
}

fn invalid(text: &[u8], pos: usize, message: impl Into<String>) -> SitemapError {
    let line = text[..pos.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1;
    SitemapError::Invalid {
        line,
        message: message.into(),
    }
}

/// Parses one sitemap file (possibly gzip-compressed).
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Sitemap, SitemapError> {
    let inflated;
    let text: &[u8] = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .take(limits.max_bytes as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| SitemapError::Gzip(e.to_string()))?;
        inflated = out;
        &inflated
    } else {
        bytes
    };
    if text.len() > limits.max_bytes {
        return Err(SitemapError::TooLarge(limits.max_bytes));
    }
    let body = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<') {
        parse_xml(body, limits)
    } else {
        parse_list(body, limits)
    }
}

fn check_url(text: &[u8], pos: usize, url: &str, limits: &Limits) -> Result<String, SitemapError> {
    let url = url.trim();
    if url.len() > limits.max_url_bytes {
        return Err(invalid(
            text,
            pos,
            format!("URL longer than {} bytes", limits.max_url_bytes),
        ));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            invalid(
                text,
                pos,
                format!("not an absolute http(s) URL: {:?}", truncate(url)),
            )
        })?;
    if rest.is_empty() || rest.starts_with('/') || url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(invalid(
            text,
            pos,
            format!("malformed URL: {:?}", truncate(url)),
        ));
    }
    Ok(url.to_owned())
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

fn parse_list(text: &[u8], limits: &Limits) -> Result<Sitemap, SitemapError> {
    let s =
        std::str::from_utf8(text).map_err(|e| invalid(text, e.valid_up_to(), "not UTF-8 text"))?;
    let mut pages = Vec::new();
    let mut pos = 0;
    for line in s.split('\n') {
        let t = line.trim();
        if !t.is_empty() && !t.starts_with('#') {
            if pages.len() == limits.max_urls {
                return Err(SitemapError::TooManyUrls(limits.max_urls));
            }
            pages.push(Page {
                loc: check_url(text, pos, t, limits)?,
                priority: None,
            });
        }
        pos += line.len() + 1;
    }
    Ok(Sitemap::Pages(pages))
}

#[derive(PartialEq)]
enum Kind {
    Unknown,
    Index,
    UrlSet,
}

fn parse_xml(text: &[u8], limits: &Limits) -> Result<Sitemap, SitemapError> {
    let mut reader = Reader::from_reader(text);
    reader.config_mut().trim_text(true);
    let mut kind = Kind::Unknown;
    let mut index = Vec::new();
    let mut pages = Vec::new();
    // The element path below the root we care about: url|sitemap, then loc|priority.
    let mut entry: Option<(Option<String>, Option<f32>)> = None;
    let mut field: Option<&'static str> = None;
    let mut buf = Vec::new();
    // Element depth: root 0, url/sitemap 1, their loc/priority 2 (image:loc is deeper).
    let mut depth = 0usize;
    loop {
        let pos = reader.buffer_position() as usize;
        let event = reader
            .read_event_into(&mut buf)
            .map_err(|e| invalid(text, pos, format!("malformed XML: {e}")))?;
        match event {
            Event::Start(e) => {
                let local = e.local_name();
                let d = depth;
                depth += 1;
                match (local.as_ref(), &kind, &entry) {
                    (b"urlset", Kind::Unknown, _) if d == 0 => kind = Kind::UrlSet,
                    (b"sitemapindex", Kind::Unknown, _) if d == 0 => kind = Kind::Index,
                    (b"url", Kind::UrlSet, None) | (b"sitemap", Kind::Index, None) if d == 1 => {
                        if pages.len() + index.len() == limits.max_urls {
                            return Err(SitemapError::TooManyUrls(limits.max_urls));
                        }
                        entry = Some((None, None));
                    }
                    (b"loc", _, Some(_)) if d == 2 => field = Some("loc"),
                    (b"priority", Kind::UrlSet, Some(_)) if d == 2 => field = Some("priority"),
                    (_, Kind::Unknown, _) => {
                        return Err(invalid(
                            text,
                            pos,
                            "not a sitemap: the root must be <urlset> or <sitemapindex>",
                        ))
                    }
                    _ => field = None,
                }
            }
            Event::Text(t) => {
                if let (Some(f), Some((loc, priority))) = (field, entry.as_mut()) {
                    let value = t
                        .unescape()
                        .map_err(|e| invalid(text, pos, format!("bad text: {e}")))?;
                    match f {
                        "loc" => *loc = Some(check_url(text, pos, &value, limits)?),
                        _ => {
                            let p: f32 = value.trim().parse().map_err(|_| {
                                invalid(
                                    text,
                                    pos,
                                    format!("priority {:?} is not a number", truncate(&value)),
                                )
                            })?;
                            if !(0.0..=1.0).contains(&p) {
                                return Err(invalid(
                                    text,
                                    pos,
                                    format!("priority {p} is outside 0.0..=1.0"),
                                ));
                            }
                            *priority = Some(p);
                        }
                    }
                }
            }
            Event::CData(t) => {
                if let (Some("loc"), Some((loc, _))) = (field, entry.as_mut()) {
                    let value = String::from_utf8_lossy(&t).into_owned();
                    *loc = Some(check_url(text, pos, &value, limits)?);
                }
            }
            Event::End(e) => {
                depth = depth.saturating_sub(1);
                let local = e.local_name();
                match local.as_ref() {
                    b"loc" | b"priority" => field = None,
                    b"url" | b"sitemap" if depth == 1 => {
                        if let Some((loc, priority)) = entry.take() {
                            let loc =
                                loc.ok_or_else(|| invalid(text, pos, "an entry without <loc>"))?;
                            match kind {
                                Kind::Index => index.push(loc),
                                _ => pages.push(Page { loc, priority }),
                            }
                        }
                    }
                    _ => {}
                }
            }
            Event::Empty(e) if kind == Kind::Unknown => {
                let local = e.local_name();
                match local.as_ref() {
                    b"urlset" => return Ok(Sitemap::Pages(Vec::new())),
                    b"sitemapindex" => return Ok(Sitemap::Index(Vec::new())),
                    _ => {
                        return Err(invalid(
                            text,
                            pos,
                            "not a sitemap: the root must be <urlset> or <sitemapindex>",
                        ))
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    match kind {
        Kind::Index => Ok(Sitemap::Index(index)),
        Kind::UrlSet => Ok(Sitemap::Pages(pages)),
        Kind::Unknown => Err(invalid(
            text,
            text.len(),
            "not a sitemap: no <urlset> or <sitemapindex>",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const URLSET: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9" xmlns:image="http://www.google.com/schemas/sitemap-image/1.1">
  <url><loc>https://shop.example/</loc><lastmod>2026-11-01T00:00:00+00:00</lastmod><changefreq>daily</changefreq><priority>1.0</priority></url>
  <url><loc>https://shop.example/women.html?a=1&amp;b=2</loc><priority>0.5</priority>
    <image:image><image:loc>https://shop.example/media/x.jpg</image:loc></image:image></url>
  <url><loc><![CDATA[https://shop.example/p/42.html]]></loc></url>
</urlset>"#;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn magento_urlset_with_images_priorities_and_cdata() {
        let Sitemap::Pages(p) = parse(URLSET.as_bytes(), &Limits::default()).unwrap() else {
            panic!("not pages")
        };
        assert_eq!(p.len(), 3, "image:loc is not a page: {p:?}");
        assert_eq!(
            p[0],
            Page {
                loc: "https://shop.example/".into(),
                priority: Some(1.0)
            }
        );
        assert_eq!(p[1].loc, "https://shop.example/women.html?a=1&b=2");
        assert_eq!(
            p[2],
            Page {
                loc: "https://shop.example/p/42.html".into(),
                priority: None
            }
        );
        assert_eq!(
            parse(&gzip(URLSET.as_bytes()), &Limits::default()).unwrap(),
            Sitemap::Pages(p)
        );
    }

    #[test]
    fn index_and_plain_list() {
        let idx = r#"<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
            <sitemap><loc>https://shop.example/sitemap/de/sitemap.xml.gz</loc></sitemap>
            <sitemap><loc>https://shop.example/sitemap/en/sitemap.xml</loc><lastmod>2026</lastmod></sitemap>
        </sitemapindex>"#;
        assert_eq!(
            parse(idx.as_bytes(), &Limits::default()).unwrap(),
            Sitemap::Index(vec![
                "https://shop.example/sitemap/de/sitemap.xml.gz".into(),
                "https://shop.example/sitemap/en/sitemap.xml".into()
            ])
        );
        let list = "# top pages\nhttps://a.example/1\n\n  http://a.example/2  \n";
        let Sitemap::Pages(p) = parse(list.as_bytes(), &Limits::default()).unwrap() else {
            panic!()
        };
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn bad_and_huge_inputs_are_clear_errors() {
        let lim = Limits {
            max_bytes: 10_000,
            max_urls: 2,
            max_url_bytes: 100,
            max_total_urls: 2,
        };
        let err = parse(
            b"<urlset>\n<url><loc>https://a/</loc></url>\n<url><loc>/relative</loc></url></urlset>",
            &lim,
        );
        assert!(
            matches!(err, Err(SitemapError::Invalid { line: 3, .. })),
            "{err:?}"
        );
        assert!(matches!(
            parse(
                b"<urlset><url><loc>https://a/</loc></url><url></url></urlset>",
                &lim
            ),
            Err(SitemapError::Invalid { .. })
        ));
        assert!(matches!(
            parse(b"<html><body>oops</body></html>", &lim),
            Err(SitemapError::Invalid { .. })
        ));
        assert!(matches!(
            parse(b"<urlset><url><loc>https://a/</loc></urlset>", &lim),
            Err(SitemapError::Invalid { .. })
        ));
        let three = "<urlset><url><loc>https://a/1</loc></url><url><loc>https://a/2</loc></url><url><loc>https://a/3</loc></url></urlset>";
        assert_eq!(
            parse(three.as_bytes(), &lim),
            Err(SitemapError::TooManyUrls(2))
        );
        // A gzip bomb: 1 MB of zeros inflates past the 10 kB limit.
        let bomb = gzip(&vec![b' '; 1_000_000]);
        assert!(bomb.len() < 10_000);
        assert_eq!(parse(&bomb, &lim), Err(SitemapError::TooLarge(10_000)));
        assert!(matches!(
            parse(&[0x1f, 0x8b, 0, 1, 2], &lim),
            Err(SitemapError::Gzip(_))
        ));
        let long = format!("https://a/{}", "x".repeat(200));
        assert!(matches!(
            parse(long.as_bytes(), &lim),
            Err(SitemapError::Invalid { line: 1, .. })
        ));
        assert!(matches!(
            parse(
                b"<urlset><url><loc>https://a/</loc><priority>7</priority></url></urlset>",
                &lim
            ),
            Err(SitemapError::Invalid { .. })
        ));
    }
}
