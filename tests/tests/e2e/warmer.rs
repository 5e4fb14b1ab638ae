//! The standalone `warmer` binary: a Magento-style sitemap warms a real varnish, the
//! origin renders each page once, a second pass is all hits; bad sitemaps are clear errors.

use std::process::Command;

use tests::{bin_dir, Cluster, CoordinatorOpts};

fn run_warmer(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_dir().join("warmer"))
        .args(args)
        .output()
        .expect("run warmer");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn field(summary: &str, name: &str) -> u64 {
    let words: Vec<&str> = summary.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {summary}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmer_fills_the_cache_from_the_sitemap_rendering_each_page_once() {
    let cluster = Cluster::start(1, "ban", CoordinatorOpts::default()).await;
    let sitemap = format!("http://{}/sitemap.xml", cluster.origin.addr);
    let via = format!("http://{}", cluster.varnish[0].http);
    let args = [
        "--sitemap",
        &sitemap,
        "--via",
        &via,
        "--host",
        "shop.test",
        "--rate",
        "400",
        "--concurrency",
        "8",
    ];
    let (ok, first) = run_warmer(&args);
    assert!(ok, "{first}");
    assert_eq!(field(&first, "urls"), 111, "{first}");
    assert_eq!(field(&first, "fetched"), 111, "{first}");
    assert_eq!(field(&first, "misses"), 111, "{first}");
    assert_eq!(field(&first, "errors"), 0, "{first}");
    for path in ["/", "/c/3", "/p/1", "/p/100"] {
        assert_eq!(
            cluster.origin.origin.renders(path),
            1,
            "{path} rendered once"
        );
    }
    let (ok, second) = run_warmer(&args);
    assert!(ok, "{second}");
    assert_eq!(field(&second, "hits"), 111, "{second}");
    assert_eq!(field(&second, "misses"), 0, "{second}");
    assert_eq!(
        cluster.origin.origin.renders("/p/1"),
        1,
        "a warm pass renders nothing"
    );

    // A malformed sitemap is a clear error naming the line, and a non-zero exit.
    let bad = cluster.dir.path().join("bad-sitemap.xml");
    std::fs::write(
        &bad,
        "<urlset>\n<url><loc>https://a/</loc></url>\n<url><loc>relative</loc></url>\n</urlset>",
    )
    .expect("write");
    let (ok, out) = run_warmer(&["--sitemap", bad.to_str().expect("utf-8"), "--via", &via]);
    assert!(!ok);
    assert!(
        out.contains("line 3") && out.contains("not an absolute http(s) URL"),
        "{out}"
    );
}
