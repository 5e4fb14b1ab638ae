//! Hit ratios and traffic from real varnishstat counters, per region, through restarts,
//! and `/metrics` as valid Prometheus text.

use std::net::SocketAddr;

use serde_json::Value;
use tests::{assert_eventually, get, raw, Cluster, CoordinatorOpts};

async fn region(cluster: &Cluster, name: &str) -> Value {
    let r = cluster
        .coordinator
        .call("GET", "/api/v1/regions", None)
        .await;
    r.json()
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// Waits until region `name`'s agent reads varnish's log (varnishncsa counts from when it
/// attached, a moment after the session or a varnishd restart): POSTs to `varnish` until
/// one is counted as served. A POST passes, so no hit or miss is added.
async fn wait_for_the_log(cluster: &Cluster, varnish: SocketAddr, name: &str) {
    let served = || async { region(cluster, name).await["served"]["requests"].as_u64() };
    let before = served().await.unwrap_or(0);
    let post = b"POST /__log HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert_eventually!(
        20,
        {
            let _ = raw(varnish, post).await;
            served().await > Some(before)
        },
        "{name}: varnish's log never counted a request"
    );
}

/// A strict reading of the Prometheus text format: every sample belongs to a family with
/// a TYPE line before it, names and labels follow the grammar, values parse as floats.
fn check_prometheus_text(text: &str) -> Result<usize, String> {
    let mut typed = std::collections::HashMap::new();
    let mut samples = 0;
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    for (i, line) in text.lines().enumerate() {
        let msg = |why: &str| format!("line {}: {why}: {line:?}", i + 1);
        let bad = |why: &str| Err(msg(why));
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                return bad("malformed TYPE");
            };
            if !name_ok(name)
                || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
            {
                return bad("bad TYPE");
            }
            if typed.insert(name.to_owned(), kind.to_owned()).is_some() {
                return bad("family typed twice");
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| msg("no value"))?;
        if value.parse::<f64>().is_err() {
            return bad("value is not a float");
        }
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                Some(l.strip_suffix('}').ok_or_else(|| msg("unclosed labels"))?),
            ),
            None => (series, None),
        };
        if !name_ok(name) {
            return bad("bad metric name");
        }
        // A histogram's (or summary's) samples are its family name plus a suffix.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                matches!(
                    typed.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
                .then_some(base)
            })
            .unwrap_or(name);
        if !typed.contains_key(family) {
            return bad("sample before its TYPE line");
        }
        if family == name && name.ends_with("_total") && typed[name] != "counter" {
            return bad("_total on a non-counter");
        }
        for pair in labels
            .into_iter()
            .flat_map(|l| l.split("\","))
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair
                .split_once("=\"")
                .ok_or_else(|| msg("label without =\""))?;
            if !name_ok(k) || v.trim_end_matches('"').contains('"') {
                return bad("bad label");
            }
        }
        samples += 1;
    }
    Ok(samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_ratio_per_region_from_real_traffic_survives_a_restart() {
    let mut cluster = Cluster::start(2, "ban", CoordinatorOpts::default()).await;
    // Both regions have sent a baseline sample.
    for name in ["region-0", "region-1"] {
        assert_eventually!(
            20,
            !region(&cluster, name).await["last_minute"].is_null(),
            "no varnishstat sample from {name}"
        );
    }
    // 10 misses, then 90 hits, on region-0 only, once its agent reads varnish's log.
    let v0 = cluster.varnish[0].http;
    wait_for_the_log(&cluster, v0, "region-0").await;
    for i in 0..10 {
        assert_eq!(get(v0, &format!("/p/{i}")).await.cache(), "MISS");
    }
    for _ in 0..9 {
        for i in 0..10 {
            assert_eq!(get(v0, &format!("/p/{i}")).await.cache(), "HIT");
        }
    }
    assert_eventually!(
        10,
        {
            let m = &region(&cluster, "region-0").await["last_minute"];
            m["hits"] == 90 && m["shopper_hits"] == 90
        },
        "hits not reported: {}",
        region(&cluster, "region-0").await
    );
    let r0 = region(&cluster, "region-0").await;
    let ratio = r0["hit_ratio"]["m1"]
        .as_f64()
        .unwrap_or_else(|| panic!("no m1 ratio: {r0}"));
    assert!(
        (ratio - 0.90).abs() <= 0.01,
        "region-0 hit ratio {ratio}: {r0}"
    );
    assert_eq!(r0["last_minute"]["misses"], 10);
    assert!(r0["requests_per_s"].as_f64() > Some(0.0));
    let r1 = region(&cluster, "region-1").await;
    assert!(
        r1["hit_ratio"]["m1"].is_null(),
        "region-1 had no traffic: {r1}"
    );
    assert_eq!(r1["last_minute"]["requests"], 0);

    // varnishd restarts: counters reset; nothing negative, and new traffic counts.
    let ready_before = cluster.origin.origin.renders("/__ready");
    cluster.varnish[0].kill9_and_restart().await;
    // The restart helper's readiness request (`/__ready`) is a miss too.
    let ready = cluster.origin.origin.renders("/__ready") - ready_before;
    wait_for_the_log(&cluster, v0, "region-0").await;
    for i in 0..10 {
        get(v0, &format!("/p/{i}")).await;
        get(v0, &format!("/p/{i}")).await;
    }
    assert_eventually!(
        15,
        {
            let m = &region(&cluster, "region-0").await["last_minute"];
            m["hits"] == 100 && m["shopper_hits"] == 100
        },
        "post-restart traffic not counted: {}",
        region(&cluster, "region-0").await
    );
    let r0 = region(&cluster, "region-0").await;
    assert!(r0["varnish_restarts"].as_u64() >= Some(1), "{r0}");
    // Our 20 misses plus the readiness requests that were misses (a repeated 404 may be a
    // hit-for-miss instead, so at most `ready` of them).
    let misses = r0["last_minute"]["misses"].as_u64().expect("misses");
    assert!(
        (20..=20 + ready).contains(&misses),
        "misses {misses}, ready {ready}: {r0}"
    );
    // The shoppers' misses: ours, and the readiness requests varnish's log saw.
    let shopper_misses = r0["last_minute"]["shopper_misses"]
        .as_u64()
        .expect("misses");
    assert!(
        (20..=misses).contains(&shopper_misses),
        "shopper misses {shopper_misses}, misses {misses}: {r0}"
    );
    let ratio = r0["hit_ratio"]["m1"].as_f64().expect("ratio");
    let expected = 100.0 / (100 + shopper_misses) as f64;
    assert!((ratio - expected).abs() < 0.001, "{ratio} vs {expected}");
    let history = cluster
        .coordinator
        .call("GET", "/api/v1/regions/region-0/history", None)
        .await
        .json();
    let minutes = history["minutes"].as_array().cloned().unwrap_or_default();
    let hits: u64 = minutes
        .iter()
        .map(|m| m["hits"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(hits, 100, "{history}");

    // /metrics is valid Prometheus text and carries the new families.
    let metrics = get(cluster.coordinator.api, "/metrics").await.body;
    let samples = check_prometheus_text(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    assert!(samples > 20);
    assert!(metrics
        .contains("coordinator_varnish_cache_hits_total{region=\"region-0\",edge=\"edge-0\"} 100"));
    assert!(metrics.contains("coordinator_region_hit_ratio{region=\"region-0\",window=\"m1\"}"));
    assert!(check_prometheus_text("x_total 1\n").is_err());
    assert!(check_prometheus_text(
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n"
    )
    .is_ok());
    assert!(check_prometheus_text("# TYPE g gauge\ng_sum 1\n").is_err());
    assert!(check_prometheus_text("# TYPE x gauge\nx{a=\"b\" 1\n").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoppers_served_times_and_5xx_come_from_varnishs_log_without_the_agents_own() {
    let rule = "[[alerts.rules]]\nname = \"slow-shoppers\"\nmetric = \"served_mean_ms\"\nabove = 40.0\nfor_minutes = 1\nmin_requests = 5\n";
    let cluster = Cluster::start(
        1,
        "ban",
        CoordinatorOpts {
            extra: rule.into(),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let c = &cluster.coordinator;
    let v0 = cluster.varnish[0].http;
    let served = || async {
        c.call("GET", "/api/v1/regions", None)
            .await
            .json()
            .as_array()
            .and_then(|a| a.first().cloned())
            .unwrap_or(Value::Null)["served"]
            .clone()
    };
    // varnishncsa sees requests from when it attached: wait until it counts one.
    let mut n = 0;
    assert_eventually!(
        20,
        {
            n += 1;
            get(v0, &format!("/attach/{n}")).await;
            served().await["requests"].as_u64() > Some(0)
        },
        "varnishncsa never counted a request"
    );
    // Every attach request is counted once a stats sample taken well after the last one
    // (a second: varnishncsa's line reaches the agent long before) has arrived.
    let last_sent = std::time::Instant::now();
    assert_eventually!(
        10,
        c.regions()
            .await
            .get("region-0")
            .and_then(|r| r.stats_age_s)
            .is_some_and(|age| age + 1.0 < last_sent.elapsed().as_secs_f64()),
        "no stats sample after the attach requests"
    );
    let before = served().await["requests"].as_u64().unwrap_or(0);
    // A warm job through the same varnish: the agent's own requests, not shoppers'.
    let urls: Vec<String> = (0..10).map(|i| format!("http://shop.test/w/{i}")).collect();
    let id = c
        .start_warm_job(&serde_json::json!({ "urls": urls, "regions": ["region-0"] }))
        .await;
    let job = c.warm_finished(id, 30).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(c.health("region-0").await, "up");
    // 20 misses the origin takes 150 ms each to render, then 5 it answers 503.
    cluster
        .origin
        .origin
        .set_delay(std::time::Duration::from_millis(150));
    for i in 0..20 {
        assert_eq!(get(v0, &format!("/slow/{i}")).await.cache(), "MISS");
    }
    cluster.origin.origin.set_delay(std::time::Duration::ZERO);
    cluster.origin.origin.set_fail_every(1);
    for i in 0..5 {
        let r = get(v0, &format!("/broken/{i}")).await;
        assert!(r.status >= 500, "{r:?}");
    }
    cluster.origin.origin.set_fail_every(0);
    // The agent's own requests through the same varnish (probes, the config health
    // check) are not shoppers: exactly 25 more are counted.
    let mut region;
    assert_eventually!(
        20,
        {
            region = c
                .call("GET", "/api/v1/regions", None)
                .await
                .json()
                .as_array()
                .and_then(|a| a.first().cloned())
                .unwrap_or(Value::Null);
            region["served"]["requests"].as_u64() == Some(before + 25)
                && region["served"]["errors_5xx"] == 5
        },
        "served figures: {region}"
    );
    let mean = region["served"]["mean_ms"].as_f64().expect("mean");
    let std = region["served"]["std_ms"].as_f64().expect("std");
    // 20 of them took the origin's 150 ms at least: the served time summed is ≥ 3 s.
    let sum_ms = mean * (before + 25) as f64;
    assert!((3000.0..30_000.0).contains(&sum_ms), "mean {mean} ms");
    // The rule on served time makes the region degraded, saying which rule and why.
    let mut seen;
    assert_eventually!(
        15,
        {
            seen = c.regions().await.get("region-0").cloned();
            seen.as_ref().is_some_and(|r| {
                r.health == coordinator::api::views::Health::Degraded
                    && r.diagnosis == Some(coordinator::api::views::Diagnosis::ShoppersSlow)
            })
        },
        "no shoppers_slow: {seen:?}"
    );
    let why = seen.and_then(|r| r.health_error).unwrap_or_default();
    assert!(
        why.contains("rule slow-shoppers") && why.contains("over 40 ms"),
        "{why}"
    );
    let healthz = tests::get_json(c.api, "/healthz")
        .await
        .unwrap_or(Value::Null);
    assert_eq!(
        healthz["regions_not_up"]["region-0"]["diagnosis"], "shoppers_slow",
        "{healthz}"
    );
    assert!(std > 10.0, "std {std} ms");
    let history = c
        .call("GET", "/api/v1/regions/region-0/history", None)
        .await
        .json();
    let minutes = history["minutes"].as_array().cloned().unwrap_or_default();
    let total: u64 = minutes
        .iter()
        .map(|m| m["served"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, before + 25, "{history}");
    assert!(minutes
        .iter()
        .any(|m| m["served_mean_ms"].as_f64().is_some()));
    let metrics = get(c.api, "/metrics").await.body;
    for want in [
        format!(
            "coordinator_shopper_response_seconds_count{{region=\"region-0\",edge=\"edge-0\"}} {}",
            before + 25
        ),
        format!(
            "coordinator_shopper_response_seconds_bucket{{region=\"region-0\",edge=\"edge-0\",le=\"0.05\"}} {}",
            before + 5
        ),
        "coordinator_shopper_responses_5xx_total{region=\"region-0\",edge=\"edge-0\"} 5".to_owned(),
    ] {
        assert!(metrics.contains(&want), "{want} missing:\n{metrics}");
    }
    eprintln!(
        "figure: served mean {mean:.1} ms std {std:.1} ms over {} shopper requests, 5 of them 5xx",
        before + 25
    );
}
