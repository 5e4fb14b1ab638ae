//! The warm secret never reaches varnish's shared-memory log (readable by anyone in the
//! varnish group), and what the log does show cannot be replayed: a warm request's
//! signature is bound to its URL and valid for 30 s, and a satellite's tier token only
//! shows tags.

use std::net::SocketAddr;

use serde_json::json;
use tests::{raw, Cluster, CoordinatorOpts, WARM_TOKEN};

/// `varnishlog -d`: everything varnishd still holds in its log, as lower-case text
/// (header names are as each client wrote them; hyper writes them in lower case).
fn varnish_log(workdir: &std::path::Path) -> String {
    let out = std::process::Command::new("varnishlog")
        .args(["-d", "-g", "raw", "-n"])
        .arg(workdir)
        .output()
        .expect("varnishlog runs");
    assert!(out.status.success(), "varnishlog: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
}

async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> tests::Resp {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    raw(addr, req.as_bytes())
        .await
        .expect("GET through varnish")
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_token_is_never_in_varnishs_log_and_a_logged_signature_cannot_be_replayed() {
    let opts = CoordinatorOpts {
        warm_extra: "origin_budget_rps = 300\nsatellite_rate = 300\n".to_owned(),
        ..CoordinatorOpts::default()
    };
    let cluster = Cluster::start_as(2, "ban", opts, true).await;
    let c = &cluster.coordinator;
    let id = c
        .start_warm_job(&json!({
            "sitemap": format!("http://{}/sitemap.xml?products=20", cluster.origin.addr),
            "host": "shop.test"}))
        .await;
    let view = c.warm_finished(id, 60).await;
    assert_eq!(view["state"], "done", "{view}");

    // The warm requests went through both regions' varnish (the satellite's fetched from
    // the shield), and neither log holds the secret anywhere: not as a request header, not
    // on the backend fetch to the shield or the origin.
    let mut logged_sig = None;
    for (i, v) in cluster.varnish.iter().enumerate() {
        let log = varnish_log(&v.workdir);
        assert!(
            log.lines()
                .any(|l| l.contains("reqheader") && l.contains("x-warm-sig: ")),
            "region-{i}: no signed warm request in the log"
        );
        assert!(
            !log.contains(&WARM_TOKEN.to_ascii_lowercase()),
            "region-{i}'s varnish log holds the warm token"
        );
        if i == 0 {
            logged_sig = log
                .lines()
                .filter(|l| l.contains("reqheader"))
                .find_map(|l| {
                    let v = l.split("x-warm-sig: ").nth(1)?;
                    Some(v.trim().to_owned())
                });
        }
    }
    let shield = cluster.varnish[0].http;

    // A signature read from the log, replayed for another page: no tags, no forced miss.
    let logged = logged_sig.expect("a logged signature");
    let ts: u64 = logged
        .split('.')
        .next()
        .and_then(|t| t.parse().ok())
        .expect("a timestamp");
    let pages: Vec<String> = std::iter::once("/".to_owned())
        .chain((1..=10).map(|c| format!("/c/{c}")))
        .chain((1..=20).map(|p| format!("/p/{p}")))
        .collect();
    let signed_for = pages
        .iter()
        .find(|p| warmer::sign::signature(WARM_TOKEN, p, ts) == logged)
        .expect("the logged signature is one of the warmed pages'");
    let other = pages
        .iter()
        .find(|p| *p != signed_for)
        .expect("another page");
    let renders = cluster.origin.origin.renders(other);
    let r = get_with(
        shield,
        other,
        &[("X-Warm-Sig", &logged), ("X-Warm-Refresh", "1")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.header("X-Magento-Tags").is_none(), "replayed for {other}");
    assert_eq!(r.cache(), "HIT", "a replayed signature forced a miss");
    assert_eq!(cluster.origin.origin.renders(other), renders);

    // The old scheme (the secret as a header) is no longer believed.
    let r = get_with(
        shield,
        "/p/4",
        &[("X-Warm-Token", WARM_TOKEN), ("X-Warm-Refresh", "1")],
    )
    .await;
    assert!(r.header("X-Magento-Tags").is_none());
    assert_eq!(r.cache(), "HIT");

    // A signature of the right page made 60 s ago (a log read a minute later): refused.
    let stale = warmer::sign::signature(WARM_TOKEN, "/p/4", now_s() - 60);
    let r = get_with(
        shield,
        "/p/4",
        &[("X-Warm-Sig", &stale), ("X-Warm-Refresh", "1")],
    )
    .await;
    assert!(r.header("X-Magento-Tags").is_none(), "stale signature");
    assert_eq!(r.cache(), "HIT");
    let renders = cluster.origin.origin.renders("/p/4");

    // The tier token a satellite sends (readable in its log) shows tags, never a miss.
    let tier = warmer::sign::tier_token(WARM_TOKEN);
    let r = get_with(
        shield,
        "/p/4",
        &[("X-Warm-Tier", &tier), ("X-Warm-Refresh", "1")],
    )
    .await;
    assert!(
        r.header("X-Magento-Tags").is_some(),
        "tier token shows tags"
    );
    assert_eq!(r.cache(), "HIT", "tier token forced a miss");
    assert_eq!(cluster.origin.origin.renders("/p/4"), renders);

    // A fresh signature for the page is what works: tags, and the refresh it asks for.
    let fresh = warmer::sign::signature_now(WARM_TOKEN, "/p/4");
    let r = get_with(
        shield,
        "/p/4",
        &[("X-Warm-Sig", &fresh), ("X-Warm-Refresh", "1")],
    )
    .await;
    assert!(r.header("X-Magento-Tags").is_some(), "fresh signature");
    assert_eq!(r.cache(), "MISS", "a signed refresh is a forced miss");
    assert_eq!(cluster.origin.origin.renders("/p/4"), renders + 1);
}
