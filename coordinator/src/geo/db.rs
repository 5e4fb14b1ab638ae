//! The MaxMind database: where an IP address is.
//!
//! [`GeoDb`] reads the whole file into memory ([`maxminddb::Reader`] over a `Vec`, no
//! mmap, so rewriting the file in place never changes what a lookup reads) and keeps the
//! reader behind an `Arc`. A reload builds a complete new reader first and swaps the
//! `Arc` in one step: a lookup uses either the old database or the new one, and no lookup
//! fails during a reload. [`GeoDb::check`] reloads when the file's identity (inode, size,
//! mtime) changed, which is how a replace-by-rename (the documented way to update it) or
//! an in-place rewrite shows up; [`GeoDb::reload`] reloads unconditionally (SIGHUP). A
//! file that fails to open keeps the old database and is counted.
//!
//! A lookup decodes only what routing needs (country code and coordinates) from City or
//! Country databases; a Country database has no coordinates, so the country's centre
//! ([`super::centroids`]) stands in.

use daemon::sync::{Recover, RecoverRw};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Deserialize;

/// Why the database could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot read GeoIP database {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a usable MaxMind database: {message}")]
    Invalid { path: String, message: String },
}

/// Where an address is, as far as the database knows.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    /// ISO 3166-1 alpha-2, when the database has one.
    pub country: Option<String>,
    /// Latitude and longitude (the record's, else the country's centre).
    pub point: Option<(f64, f64)>,
}

/// What the database says about itself (for `/api/v1/route` users and metrics).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DbInfo {
    pub path: String,
    pub database_type: String,
    /// When MaxMind built it (Unix seconds).
    pub build_epoch: u64,
    /// Successful loads since start (the first included).
    pub loads: u64,
    /// Reloads that failed (the previous database stayed in use).
    pub reload_errors: u64,
    pub last_error: Option<String>,
}

/// The file's identity: a change means a new database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

struct Loaded {
    reader: maxminddb::Reader<Vec<u8>>,
}

/// A database that can be swapped under running lookups; share behind an `Arc`.
pub struct GeoDb {
    path: PathBuf,
    current: RwLock<Arc<Loaded>>,
    /// The stamp last tried (loaded or failed), so a bad file is reported once.
    tried: Mutex<Option<Stamp>>,
    loads: AtomicU64,
    reload_errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb").field("path", &self.path).finish()
    }
}

fn open(path: &Path) -> Result<Loaded, DbError> {
    let bytes = std::fs::read(path).map_err(|source| DbError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let invalid = |message: String| DbError::Invalid {
        path: path.display().to_string(),
        message,
    };
    let reader = maxminddb::Reader::from_source(bytes).map_err(|e| invalid(e.to_string()))?;
    // A truncated copy can carry valid metadata; a lookup walks the tree and the data.
    let probe: IpAddr = if reader.metadata().ip_version == 6 {
        IpAddr::V6(std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::new(8, 8, 8, 8))
    };
    let result = reader.lookup(probe).map_err(|e| invalid(e.to_string()))?;
    result
        .decode::<Record<'_>>()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(Loaded { reader })
}

/// The part of a City or Country record routing reads.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<CountryRec<'a>>,
    #[serde(borrow, default)]
    registered_country: Option<CountryRec<'a>>,
    #[serde(default)]
    location: Option<LocationRec>,
}

#[derive(Deserialize)]
struct CountryRec<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct LocationRec {
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
}

/// Addresses no database places: private, loopback, link-local, documentation...
pub fn is_unroutable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64 // 100.64/10 CGNAT
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_unroutable(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

impl GeoDb {
    /// Opens `path`; a missing or unusable file is an error (the caller exits).
    pub fn open(path: &Path) -> Result<GeoDb, DbError> {
        let before = stamp(path).ok();
        let loaded = open(path)?;
        Ok(GeoDb {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(loaded)),
            tried: Mutex::new(before),
            loads: AtomicU64::new(1),
            reload_errors: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    fn reader(&self) -> Arc<Loaded> {
        self.current.read_locked().clone()
    }

    /// Where `ip` is; `None` when the database does not know it (or it is a private
    /// address, which no database places).
    pub fn locate(&self, ip: IpAddr) -> Option<Located> {
        if is_unroutable(ip) {
            return None;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let db = self.reader();
        let found = db.reader.lookup(ip).ok()?;
        let rec = found.decode::<Record<'_>>().ok()??;
        let country = rec
            .country
            .and_then(|c| c.iso_code)
            .or(rec.registered_country.and_then(|c| c.iso_code))
            .map(str::to_owned);
        let point = match rec.location {
            Some(LocationRec {
                latitude: Some(lat),
                longitude: Some(lon),
            }) => Some((lat, lon)),
            _ => country.as_deref().and_then(super::centroids::centroid),
        };
        if country.is_none() && point.is_none() {
            return None;
        }
        Some(Located { country, point })
    }

    /// Reloads if the file changed since it was last tried. `Ok(true)`: a new database
    /// is in use.
    pub fn check(&self) -> Result<bool, DbError> {
        let now = stamp(&self.path).ok();
        {
            let mut tried = self.tried.locked();
            if *tried == now {
                return Ok(false);
            }
            *tried = now;
        }
        if now.is_none() {
            // Gone (mid-rename, or removed): keep serving the old one; a new file has a
            // new stamp and is tried then.
            return self.failed(DbError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        self.reload()
    }

    /// Reads the file again whatever its stamp (SIGHUP).
    pub fn reload(&self) -> Result<bool, DbError> {
        let before = stamp(&self.path).ok();
        match open(&self.path) {
            Ok(loaded) => {
                *self.current.write_locked() = Arc::new(loaded);
                *self.tried.locked() = before;
                self.loads.fetch_add(1, Ordering::Relaxed);
                *self.last_error.locked() = None;
                Ok(true)
            }
            Err(e) => self.failed(e),
        }
    }

    fn failed(&self, e: DbError) -> Result<bool, DbError> {
        self.reload_errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.locked() = Some(e.to_string());
        Err(e)
    }

    pub fn info(&self) -> DbInfo {
        let db = self.reader();
        DbInfo {
            path: self.path.display().to_string(),
            database_type: db.reader.metadata().database_type.clone(),
            build_epoch: db.reader.metadata().build_epoch,
            loads: self.loads.load(Ordering::Relaxed),
            reload_errors: self.reload_errors.load(Ordering::Relaxed),
            last_error: self.last_error.locked().clone(),
        }
    }
}

#[cfg(test)]
#[path = "db_tests.rs"]
pub(crate) mod tests;
