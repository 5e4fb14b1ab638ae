use super::*;

pub(crate) fn test_db(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/data/geoip/{name}.mmdb"))
}

#[test]
fn city_database_gives_country_and_point() {
    let db = GeoDb::open(&test_db("GeoIP2-City-Test")).expect("open");
    let london = db
        .locate("81.2.69.142".parse().expect("ip"))
        .expect("known");
    assert_eq!(london.country.as_deref(), Some("GB"));
    let (lat, lon) = london.point.expect("point");
    assert!((lat - 51.5142).abs() < 1e-3 && (lon + 0.0931).abs() < 1e-3);
    let jp = db
        .locate("2001:218::1".parse().expect("ip"))
        .expect("v6 known");
    assert_eq!(jp.country.as_deref(), Some("JP"));
    assert_eq!(db.locate("10.1.2.3".parse().expect("ip")), None, "private");
    assert_eq!(
        db.locate("1.1.1.1".parse().expect("ip")),
        None,
        "not in the test db"
    );
    assert_eq!(db.info().database_type, "GeoIP2-City");
}

#[test]
fn country_database_uses_the_country_centre() {
    let db = GeoDb::open(&test_db("GeoLite2-Country-Test")).expect("open");
    let gb = db
        .locate("81.2.69.142".parse().expect("ip"))
        .expect("known");
    assert_eq!(gb.country.as_deref(), Some("GB"));
    assert_eq!(gb.point, super::super::centroids::centroid("GB"));
}

#[test]
fn bad_files_are_refused_at_open_and_kept_out_at_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("geo.mmdb");
    assert!(matches!(GeoDb::open(&path), Err(DbError::Io { .. })));
    std::fs::write(&path, b"not a database").expect("write");
    assert!(matches!(GeoDb::open(&path), Err(DbError::Invalid { .. })));

    std::fs::copy(test_db("GeoIP2-City-Test"), &path).expect("copy");
    let db = GeoDb::open(&path).expect("open");
    assert!(!db.check().expect("unchanged"));
    // Truncated in place: the old database stays, the error is counted once.
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).expect("truncate");
    assert!(db.check().is_err());
    assert!(!db.check().expect("same bad file: not retried"));
    assert!(db.locate("81.2.69.142".parse().expect("ip")).is_some());
    let info = db.info();
    assert_eq!(info.reload_errors, 1);
    assert!(info.last_error.is_some());
    // Replaced by rename with a Country database: it takes over.
    let tmp = dir.path().join("geo.mmdb.new");
    std::fs::copy(test_db("GeoLite2-Country-Test"), &tmp).expect("copy");
    std::fs::rename(&tmp, &path).expect("rename");
    assert!(db.check().expect("new file"));
    assert_eq!(db.info().database_type, "GeoLite2-Country");
    assert_eq!(db.info().last_error, None);
    assert_eq!(db.info().loads, 2);
}

#[test]
fn unroutable_addresses() {
    for ip in [
        "127.0.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "::1",
        "fd00::1",
        "::ffff:10.0.0.1",
    ] {
        assert!(is_unroutable(ip.parse().expect("ip")), "{ip}");
    }
    for ip in ["81.2.69.142", "2a02:d3c0::1", "::ffff:81.2.69.142"] {
        assert!(!is_unroutable(ip.parse().expect("ip")), "{ip}");
    }
}
