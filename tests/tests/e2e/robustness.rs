//! Bad input gets a clear answer and loses nothing; the listener stays healthy.

use tests::{get_json, magento_purge, purge_tags, raw, temp_dir, CoordinatorOpts, CoordinatorProc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_answers_and_never_a_flush() {
    let dir = temp_dir();
    let c = CoordinatorProc::start(dir.path(), &CoordinatorOpts::default()).await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "empty pattern",
            b"PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: \r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        ("invalid regex", magento_purge("((^|,)cat_p_1(,|$)"), 400),
        (
            "no header",
            b"PURGE /some/path HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "wrong method",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            405,
        ),
        (
            "garbage",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n".to_vec(),
            400,
        ),
        ("not http", b"HELLO\r\n\r\n".to_vec(), 400),
        (
            "oversized headers",
            format!(
                "PURGE / HTTP/1.1\r\nX-Pool: {}\r\n\r\n",
                "a".repeat(200 * 1024)
            )
            .into_bytes(),
            431,
        ),
    ];
    for (name, bytes, status) in &cases {
        let r = raw(c.purge, bytes)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.status, *status, "{name}: {}", r.body);
        if *status == 400 {
            let reason = r.json()["error"].as_str().unwrap_or_default().to_owned();
            assert!(!reason.is_empty(), "{name}: a 400 carries a reason");
        }
    }
    assert_eq!(c.head().await, 0, "nothing may be logged from bad input");

    // A 64 KiB header line of real tags is accepted.
    let tags: Vec<String> = (0..3300).map(|i| format!("cat_p_{i}")).collect();
    let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let pattern = tests::tags_pattern(&refs);
    assert!(pattern.len() >= 64 * 1000, "{}", pattern.len());
    let r = raw(c.purge, &magento_purge(&pattern)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let p = get_json(c.api, "/api/v1/purges/1").await.expect("purge 1");
    assert_eq!(p["op"]["tags"].as_array().map(Vec::len), Some(3300));

    // Still healthy.
    assert_eq!(purge_tags(c.purge, &["cat_p_1"]).await, 2);
    let metrics = tests::get(c.api, "/metrics").await.body;
    assert!(
        metrics.contains("coordinator_purge_requests_total{result=\"bad_request\"} 6"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_outside_the_allow_list_get_405() {
    let dir = temp_dir();
    let c = CoordinatorProc::start(
        dir.path(),
        &CoordinatorOpts {
            allow: vec!["10.0.0.0/8".into()],
            ..Default::default()
        },
    )
    .await;
    let r = raw(c.purge, &magento_purge(&tests::tags_pattern(&["cat_p_1"])))
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]
        .as_str()
        .unwrap_or_default()
        .contains("not allowed"));
    assert_eq!(c.head().await, 0);
}
