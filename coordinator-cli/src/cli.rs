//! The ops commands: `coordinator config ...` and `coordinator purge ...` talk to a
//! running coordinator's JSON API ([`ApiClient`]); nothing here touches its state.
//!
//! The token comes from `--token`, `$COORDINATOR_TOKEN` or `--token-file` (in that
//! order) and is only ever sent in the `Authorization` header, never printed.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use coordinator::api::views::{
    name_of, ApiError, BundleView, EdgeView, JobList, JobState, JobView, PurgeAccepted, PurgeBody,
    PurgeView, RegionStatus, RegionView, RouteView, Started, VersionInfo, WarmStarted,
};
use coordinator::bundle::store::StoredVersion;
use coordinator::bundle::Bundle;
use coordinator::monitor::{fleet_status, FleetStatus};
use coordinator::rollout::Phase;

/// What can go wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the API at {api}: {reason}")]
    Unreachable { api: String, reason: String },
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
    #[error("{0}")]
    Failed(String),
}

/// A client for one coordinator API.
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// A non-2xx answer; a 401 says where the token comes from.
pub fn api_error(status: u16, message: String, had_token: bool) -> CliError {
    let message = match (status, had_token) {
        (401, false) => format!(
            "{message} (this needs the API token: give --token-file FILE, --token or $COORDINATOR_TOKEN)"
        ),
        (401, true) => format!(
            "{message} (the token given was refused: is --token-file one of the coordinator's [api] token_file or [[api.tokens]] files?)"
        ),
        (403, true) if message.contains("lacks the") => format!(
            "{message} (give a token with that scope in --token-file, or add the scope to its [[api.tokens]] entry)"
        ),
        _ => message,
    };
    CliError::Api { status, message }
}

impl ApiClient {
    /// `api` is `http://host:port`; the token is resolved from the three sources.
    pub fn new(
        api: &str,
        token: Option<String>,
        token_file: Option<&Path>,
    ) -> Result<Self, CliError> {
        if !api.starts_with("http://") {
            return Err(CliError::Usage(format!(
                "--api {api:?} must be an http:// URL"
            )));
        }
        let token = match (token, token_file) {
            (Some(t), _) => Some(t),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    CliError::Usage(format!("cannot read --token-file {}: {e}", f.display()))
                })?;
                let t = text.trim();
                if t.is_empty() {
                    return Err(CliError::Usage(format!(
                        "--token-file {} is empty",
                        f.display()
                    )));
                }
                Some(t.to_owned())
            }
            (None, None) => None,
        };
        Ok(ApiClient {
            base: api.trim_end_matches('/').to_owned(),
            token,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// `GET /api/v1/config`, with errors in full when we hold the token (without it the
    /// coordinator shows each error's place and one line only).
    fn config_path(&self) -> &'static str {
        if self.token.is_some() {
            "/api/v1/config?detail=full"
        } else {
            "/api/v1/config"
        }
    }

    /// One request, its answer read as `T`; a non-2xx answer becomes [`CliError::Api`]
    /// with the JSON `error`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, CliError> {
        let unreachable = |reason: String| self.unreachable(reason);
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| CliError::Usage(e.to_string()))?,
            None => Vec::new(),
        };
        let req = self.request(method, path, body)?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, CliError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .map_err(|_| unreachable("timed out".into()))??;
        if (200..300).contains(&status) {
            serde_json::from_slice(&bytes).map_err(|e| {
                CliError::Failed(format!("unexpected answer from {method} {path}: {e}"))
            })
        } else {
            Err(self.refused(status, &bytes))
        }
    }

    /// A request to `path` with the token, if we hold one.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Request<Full<Bytes>>, CliError> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        req.body(Full::new(Bytes::from(body)))
            .map_err(|e| CliError::Usage(e.to_string()))
    }

    fn unreachable(&self, reason: String) -> CliError {
        CliError::Unreachable {
            api: self.base.clone(),
            reason,
        }
    }

    /// A non-2xx answer: its JSON `error` (or its text), with the token hint.
    fn refused(&self, status: u16, body: &[u8]) -> CliError {
        let message = serde_json::from_slice::<ApiError>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
        api_error(status, message, self.token.is_some())
    }
}

impl ApiClient {
    /// `POST path`, its answer's body streamed into `out` (a non-2xx answer becomes
    /// [`CliError::Api`]). No overall timeout: a backup may be large.
    pub async fn download(&self, path: &str, out: &mut std::fs::File) -> Result<u64, CliError> {
        use std::io::Write;
        let unreachable = |reason: String| self.unreachable(reason);
        let req = self.request("POST", path, Vec::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(60), self.http.request(req))
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        if !(200..300).contains(&status) {
            let bytes = body
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            return Err(self.refused(status, &bytes));
        }
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| unreachable(format!("answer cut off: {e}")))?;
            if let Some(data) = frame.data_ref() {
                out.write_all(data)
                    .map_err(|e| CliError::Failed(e.to_string()))?;
                written += data.len() as u64;
            }
        }
        Ok(written)
    }
}

/// `backup FILE`: the running coordinator's state, saved, then checked end to end.
pub async fn backup(api: &ApiClient, file: &Path) -> Result<(), CliError> {
    use coordinator::backup;
    let failed = |e: backup::BackupError| CliError::Failed(e.to_string());
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let mut out = backup::create_private(&partial).map_err(failed)?;
    let got = api.download("/api/v1/backup", &mut out).await;
    let checked = got.and_then(|_| {
        backup::finish(out, &partial).map_err(failed)?;
        backup::verify(&partial).map_err(failed)
    });
    let header = match checked {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, file)
        .map_err(|e| CliError::Failed(format!("{}: {e}", file.display())))?;
    let bytes: u64 = header.files.iter().map(|f| f.bytes).sum();
    println!(
        "backup {}: purge log {} up to seq {}, {} files, {bytes} bytes, schema {}",
        file.display(),
        header.log_id,
        header.head,
        header.files.len(),
        header.schema
    );
    Ok(())
}

/// `restore FILE --state-dir DIR`.
pub fn restore(file: &Path, dir: &Path, force: bool) -> Result<(), CliError> {
    let report = coordinator::backup::restore(file, dir, force)
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let h = &report.header;
    println!(
        "restored {} into {}: purge log {} up to seq {} is now log {}; agents that applied purges past seq {} get a full ban when they reconnect, the others resume",
        file.display(),
        dir.display(),
        h.log_id,
        h.head,
        report.new_log_id,
        h.head
    );
    Ok(())
}

/// `route IP`: the region for a client and every candidate.
pub async fn route(api: &ApiClient, ip: &str, json: bool) -> Result<(), CliError> {
    let ip: std::net::IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| CliError::Usage(format!("{ip:?} is not an IPv4 or IPv6 address")))?;
    let view: RouteView = api
        .call("GET", &format!("/api/v1/route?ip={ip}"), None::<&()>)
        .await?;
    if json {
        let text =
            serde_json::to_string_pretty(&view).map_err(|e| CliError::Failed(e.to_string()))?;
        daemon::say!("{text}");
    } else {
        daemon::show!("{}", route_lines(&view));
    }
    Ok(())
}

/// `90s`, `30m`, `2h`, `1d` (or a bare number of seconds) as seconds.
pub fn duration_s(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: use e.g. 90s, 30m, 2h or 1d"
            ))
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: use e.g. 90s, 30m, 2h or 1d"))?;
    match n.checked_mul(scale) {
        Some(0) => Err(format!("{text:?}: a duration must be more than zero")),
        Some(s) => Ok(s),
        None => Err(format!("{text:?} is too long")),
    }
}

/// `coordinator audit`: the newest entries, one line each.
pub async fn audit(
    api: &ApiClient,
    limit: usize,
    since: Option<&str>,
    json: bool,
) -> Result<(), CliError> {
    let mut path = format!("/api/v1/audit?limit={}", limit.clamp(1, 1000));
    if let Some(since) = since {
        let secs = duration_s(since).map_err(CliError::Usage)?;
        path.push_str(&format!("&since={secs}s"));
    }
    let listed: coordinator::audit::Listed = api.call("GET", &path, None::<&()>).await?;
    if json {
        let text =
            serde_json::to_string_pretty(&listed).map_err(|e| CliError::Failed(e.to_string()))?;
        daemon::say!("{text}");
    } else {
        daemon::show!("{}", audit_lines(&listed));
    }
    Ok(())
}

/// The text `audit` prints: when, token, source, action, status, what was asked.
pub fn audit_lines(listed: &coordinator::audit::Listed) -> String {
    let mut out = String::new();
    if let Some(e) = &listed.error {
        out.push_str(&format!("note: {e}\n"));
    }
    out.push_str(&format!(
        "{:<24} {:<18} {:<16} {:<16} {:>6}  {}\n",
        "WHEN", "TOKEN", "SOURCE", "ACTION", "STATUS", "ASKED / RESULT"
    ));
    for entry in &listed.entries {
        let e = &entry.event;
        let when = std::time::UNIX_EPOCH + Duration::from_millis(entry.at_ms);
        let when = coordinator::edges::fmt_time(when);
        let when = when.split('.').next().unwrap_or(&when).to_owned();
        let result = e.result.as_ref().map(|r| match r["error"].as_str() {
            Some(error) if e.status >= 400 => error.to_owned(),
            _ => scalars(r),
        });
        let detail = match (&e.asked, result.filter(|r| !r.is_empty())) {
            (Some(a), Some(r)) => format!("{a} -> {r}"),
            (Some(a), None) => a.to_string(),
            (None, Some(r)) => r,
            (None, None) => String::new(),
        };
        let mut detail: String = detail.chars().take(160).collect();
        if detail.is_empty() {
            detail.push('-');
        }
        out.push_str(&format!(
            "{:<24} {:<18} {:<16} {:<16} {:>6}  {}\n",
            when,
            e.token.as_deref().unwrap_or("-"),
            e.source,
            e.action,
            e.status,
            detail
        ));
    }
    if listed.entries.is_empty() {
        out.push_str("(no entries)\n");
    }
    out
}

/// A JSON answer's top-level plain fields as `key=value` (`version=…`, `seq=…`): what a
/// line has room for.
fn scalars(v: &serde_json::Value) -> String {
    match v.as_object() {
        Some(map) => map
            .iter()
            .filter(|(_, v)| !v.is_object() && !v.is_array() && !v.is_null())
            .map(|(k, v)| match v.as_str() {
                Some(s) => format!("{k}={s}"),
                None => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        None => v.to_string(),
    }
}

/// The text `route` prints.
pub fn route_lines(view: &RouteView) -> String {
    let km = |d: Option<f64>| d.map_or_else(|| "-".to_owned(), |d| format!("{d:.0} km"));
    let addresses: Vec<String> = view.addresses.iter().map(|a| a.to_string()).collect();
    let mut out = format!(
        "{}: {} ({}), {}, country {}\naddresses: {}\n",
        view.ip,
        view.region,
        name_of(&view.reason),
        km(view.distance_km),
        view.country.as_deref().unwrap_or("unknown"),
        if addresses.is_empty() {
            "-".to_owned()
        } else {
            addresses.join(" ")
        },
    );
    out.push_str(&format!(
        "{:<20} {:>10}  {}\n",
        "REGION", "DISTANCE", "ELIGIBLE"
    ));
    for c in &view.candidates {
        let why: Vec<String> = c.why_not.iter().map(name_of).collect();
        let eligible = if c.eligible {
            "yes".to_owned()
        } else {
            format!("no: {}", why.join(", "))
        };
        out.push_str(&format!(
            "{:<20} {:>10}  {}\n",
            c.region,
            km(c.distance_km),
            eligible
        ));
    }
    out
}

/// `config push DIR`: prints the version and, with `wait`, follows the rollout to its end.
pub async fn config_push(
    api: &ApiClient,
    dir: &Path,
    canary: bool,
    wait: bool,
    force: bool,
) -> Result<(), CliError> {
    let bundle =
        Bundle::from_dir(dir).map_err(|e| CliError::Failed(format!("{}: {e}", dir.display())))?;
    let started: Started = api
        .call(
            "POST",
            &format!("/api/v1/config?canary={canary}&force={force}"),
            Some(&bundle),
        )
        .await?;
    report_started(&started);
    match &started.rollout {
        Some(r) if wait => follow(api, r.id).await,
        _ => Ok(()),
    }
}

/// `config rollback [VERSION]`.
pub async fn config_rollback(
    api: &ApiClient,
    version: Option<String>,
    wait: bool,
) -> Result<(), CliError> {
    #[derive(Serialize)]
    struct Rollback {
        version: Option<String>,
    }
    let started: Started = api
        .call(
            "POST",
            "/api/v1/config/rollback",
            Some(&Rollback { version }),
        )
        .await?;
    report_started(&started);
    match &started.rollout {
        Some(r) if wait => follow(api, r.id).await,
        _ => Ok(()),
    }
}

fn report_started(started: &Started) {
    let version = &started.version;
    let fresh = if started.new_version { " (new)" } else { "" };
    match &started.rollout {
        None => {
            daemon::say!("version {version}{fresh} already runs everywhere; nothing to roll out")
        }
        Some(r) if r.phase == Phase::Canary => daemon::say!(
            "version {version}{fresh}: rolling out, canary region {} first",
            r.canary_region.as_deref().unwrap_or("?")
        ),
        Some(_) => daemon::say!("version {version}{fresh}: rolling out to every edge"),
    }
}

/// How long `--wait` waits with no edge to roll out to before it says so and exits.
const NO_EDGE_WAIT: Duration = Duration::from_secs(30);

/// Polls `/api/v1/config` until rollout `id` is done or failed, or until no edge it
/// needs has been connected for [`NO_EDGE_WAIT`] (the rollout goes on without us).
async fn follow(api: &ApiClient, id: u64) -> Result<(), CliError> {
    let started = Instant::now();
    let mut last = String::new();
    let mut edgeless_since: Option<Instant> = None;
    loop {
        let view: BundleView = api.call("GET", api.config_path(), NO_BODY).await?;
        let Some(rollout) = view.rollout.as_ref().filter(|r| r.id == id) else {
            return Err(CliError::Failed(
                "another rollout superseded this one".into(),
            ));
        };
        let phase = rollout.phase;
        let line = progress_line(&view, rollout);
        // Countdowns change every second; print when the words change.
        let key: String = line.chars().filter(|c| !c.is_ascii_digit()).collect();
        if key != last {
            daemon::say!("  [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
            last = key;
        }
        let version = &rollout.version;
        let edges = view.edges.len();
        let no_edge = edges == 0
            || view
                .waiting
                .as_deref()
                .is_some_and(|w| w.starts_with("no connected edge"));
        edgeless_since = if no_edge && !matches!(phase, Phase::Done | Phase::Failed) {
            Some(edgeless_since.unwrap_or_else(Instant::now))
        } else {
            None
        };
        if edgeless_since.is_some_and(|t| t.elapsed() >= NO_EDGE_WAIT) {
            return Err(CliError::Failed(format!(
                "rollout {id}: {} for {}s: version {version} is the desired one and goes to each edge as it connects; the rollout stays in progress until then (another push meanwhile needs --force)",
                if edges == 0 { "no edge is connected".to_owned() } else { view.waiting.clone().unwrap_or_default() },
                NO_EDGE_WAIT.as_secs()
            )));
        }
        match phase {
            Phase::Done => {
                daemon::say!(
                    "rollout {id} done: version {version} runs on every connected edge ({edges})"
                );
                return Ok(());
            }
            Phase::Failed => {
                daemon::say!(
                    "rollout {id} of {version} failed: every edge goes back to the version it ran before it"
                );
                return Err(CliError::Failed(format!(
                    "rollout failed: {}",
                    rollout.error.as_deref().unwrap_or("unknown error")
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// One progress line of `--wait`: the phase, and what it waits for or, with nothing to
/// wait for, what it means (the version and the edges running it, or why it failed).
pub fn progress_line(view: &BundleView, rollout: &coordinator::rollout::Rollout) -> String {
    let version = &rollout.version;
    let running = view
        .edges
        .iter()
        .filter(|e| e.active_version.as_deref() == Some(version.as_str()))
        .count();
    let what = match (
        view.waiting.as_deref().filter(|w| !w.is_empty()),
        rollout.phase,
    ) {
        (Some(waiting), _) => waiting.to_owned(),
        (None, Phase::Failed) => format!(
            "version {version}: {}",
            rollout.error.as_deref().unwrap_or("unknown error")
        ),
        (None, _) => format!(
            "version {version} on {running} of {} edge(s)",
            view.edges.len()
        ),
    };
    format!("{}: {what}", name_of(&rollout.phase))
}

/// `config status`: the desired version and every edge's state.
pub async fn config_status(api: &ApiClient) -> Result<(), CliError> {
    let view: BundleView = api.call("GET", api.config_path(), NO_BODY).await?;
    daemon::say!(
        "desired {}  current {}  drift policy {}",
        view.desired.as_deref().unwrap_or("-"),
        view.current.as_deref().unwrap_or("-"),
        name_of(&view.drift_policy)
    );
    if let Some(r) = &view.rollout {
        daemon::say!(
            "rollout #{} {} {}: {}{}",
            r.id,
            r.kind,
            r.version,
            name_of(&r.phase),
            r.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    daemon::say!(
        "{:<24} {:<16} {:<12} {:<18} ERROR",
        "EDGE",
        "REGION",
        "STATE",
        "ACTIVE"
    );
    for e in &view.edges {
        daemon::say!(
            "{:<24} {:<16} {:<12} {:<18} {}",
            e.id,
            e.region,
            name_of(&e.state),
            e.active_version.as_deref().unwrap_or("-"),
            e.error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// `config list`.
pub async fn config_list(api: &ApiClient) -> Result<(), CliError> {
    let view: BundleView = api.call("GET", api.config_path(), NO_BODY).await?;
    let list: Vec<VersionInfo> = api.call("GET", "/api/v1/config/versions", NO_BODY).await?;
    daemon::say!(
        "{:<18} {:<20} {:>8}  FILES",
        "VERSION",
        "CREATED (UTC)",
        "BYTES"
    );
    for v in &list {
        let version = Some(v.version.as_str());
        let mark = if view.current.as_deref() == version {
            " (current)"
        } else if view.desired.as_deref() == version {
            " (rolling out)"
        } else {
            ""
        };
        let when = coordinator::edges::fmt_time(
            std::time::UNIX_EPOCH + Duration::from_millis(v.created_at_ms),
        );
        daemon::say!(
            "{:<18} {:<20} {:>8}  {}{mark}",
            v.version,
            when.get(..19).unwrap_or(&when),
            v.bytes,
            v.files.join(", ")
        );
    }
    Ok(())
}

async fn fetch(api: &ApiClient, version: &str) -> Result<Bundle, CliError> {
    let v: StoredVersion = api
        .call(
            "GET",
            &format!("/api/v1/config/versions/{version}"),
            NO_BODY,
        )
        .await?;
    Ok(v.bundle)
}

/// `config show VERSION [FILE]`.
pub async fn config_show(
    api: &ApiClient,
    version: &str,
    file: Option<&str>,
) -> Result<(), CliError> {
    let bundle = fetch(api, version).await?;
    for (name, text) in &bundle.files {
        if file.is_some_and(|f| f != name) {
            continue;
        }
        if file.is_none() {
            daemon::say!("==> {name} <==");
        }
        daemon::show!("{text}");
        if !text.ends_with('\n') {
            daemon::say!();
        }
    }
    Ok(())
}

/// `config diff A B`: a unified diff per changed file.
pub async fn config_diff(api: &ApiClient, a: &str, b: &str) -> Result<(), CliError> {
    let (old, new) = (fetch(api, a).await?, fetch(api, b).await?);
    daemon::show!("{}", diff(&old, &new, a, b));
    Ok(())
}

/// The unified diff between two bundles (empty when identical).
pub fn diff(old: &Bundle, new: &Bundle, a: &str, b: &str) -> String {
    let mut names: Vec<&String> = old.files.keys().chain(new.files.keys()).collect();
    names.sort();
    names.dedup();
    let mut out = String::new();
    for name in names {
        let x = old.files.get(name).map(String::as_str).unwrap_or("");
        let y = new.files.get(name).map(String::as_str).unwrap_or("");
        if x == y {
            continue;
        }
        let text = similar::TextDiff::from_lines(x, y)
            .unified_diff()
            .context_radius(3)
            .header(&format!("{a}/{name}"), &format!("{b}/{name}"))
            .to_string();
        out.push_str(&text);
    }
    out
}

/// `status`: one line per region (or the JSON); the exit code is the fleet's health
/// (`monitor::fleet_status`, as `/healthz` says it), Nagios-style: 0 up, 1 degraded,
/// 2 down, 3 unknown (a region the coordinator cannot see).
pub async fn status(api: &ApiClient, json: bool) -> Result<u8, CliError> {
    let regions: Vec<RegionView> = api.call("GET", "/api/v1/regions", NO_BODY).await?;
    if json {
        daemon::say!(
            "{}",
            serde_json::to_string_pretty(&regions).unwrap_or_default()
        );
    } else {
        daemon::show!("{}", status_table(&regions));
    }
    Ok(status_code(&regions))
}

/// The Nagios-style code for a set of regions: 0 all up (OK), 1 any degraded
/// (WARNING), 2 any down (CRITICAL), 3 any unknown and none worse (UNKNOWN). A drained
/// region does not count: it is in maintenance, its alerts are held.
pub fn status_code(regions: &[RegionView]) -> u8 {
    match fleet_status(regions.iter().filter(|r| !r.drained).map(|r| r.health)) {
        FleetStatus::Ok => 0,
        FleetStatus::Degraded => 1,
        FleetStatus::Down => 2,
        FleetStatus::Unknown => 3,
    }
}

/// The per-region table `status` prints.
pub fn status_table(regions: &[RegionView]) -> String {
    let pct = |v: Option<f64>| {
        v.map(|r| format!("{:.1}%", r * 100.0))
            .unwrap_or_else(|| "-".into())
    };
    let mut out = format!(
        "{:<16} {:<9} {:>6} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9}  {}\n",
        "REGION",
        "HEALTH",
        "EDGES",
        "HIT 1M",
        "HIT 5M",
        "HIT 1H",
        "REQ/S",
        "OBJECTS",
        "PURGE LAG",
        "WHY"
    );
    let mut notes = String::new();
    for r in regions {
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let why = match (r.diagnosis, r.stats_stale) {
            (Some(d), _) => d.as_str(),
            (None, true) => "stats_stale",
            (None, false) => "",
        };
        let why = if r.drained {
            format!("drained {why}")
        } else {
            why.to_owned()
        };
        out.push_str(
            format!(
                "{:<16} {:<9} {:>6} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9}  {}",
                r.name,
                name_of(&r.health),
                format!("{}/{}", r.edges_connected, r.edges),
                pct(r.hit_ratio.m1),
                pct(r.hit_ratio.m5),
                pct(r.hit_ratio.h1),
                or_dash(r.requests_per_s.map(|v| format!("{v:.1}"))),
                or_dash(r.objects.map(|v| v.to_string())),
                r.purge_lag,
                why,
            )
            .trim_end(),
        );
        out.push('\n');
        if let Some(d) = &r.drain {
            notes.push_str(&format!(
                "  {}: drained by {}{}{}\n",
                r.name,
                d.by,
                d.until_ms
                    .map(|u| format!(" until {}", fmt_ms(u)))
                    .unwrap_or_default(),
                d.reason
                    .as_ref()
                    .map(|x| format!(": {x}"))
                    .unwrap_or_default(),
            ));
        }
        if let Some(e) = &r.health_error {
            notes.push_str(&format!("  {}: {e}\n", r.name));
        }
    }
    out + &notes
}

/// A time in ms since the epoch, to the second (`2026-12-07T14:00:00Z`).
pub fn fmt_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(ms / 1000);
    coordinator::edges::fmt_time(t).replace(".000000Z", "Z")
}

/// `purge --tag T... | --url U [--host H] | --all [--wait]`: with `wait`, polls until
/// every connected edge applied it and prints each edge's time from receipt.
pub async fn purge(
    api: &ApiClient,
    body: &PurgeBody,
    wait: Option<Duration>,
) -> Result<(), CliError> {
    let answer: PurgeAccepted = api.call("POST", "/api/v1/purges", Some(body)).await?;
    if answer.spooled {
        daemon::say!("spooled: etcd did not commit in time; the coordinator appends it to the log once etcd takes writes again");
        return Ok(());
    }
    daemon::say!("logged as purge {}", answer.seq);
    let Some(limit) = wait else { return Ok(()) };
    let started = Instant::now();
    loop {
        let view: PurgeView = api
            .call("GET", &format!("/api/v1/purges/{}", answer.seq), NO_BODY)
            .await?;
        let edges: Vec<EdgeView> = api.call("GET", "/api/v1/edges", NO_BODY).await?;
        let pending = pending_edges(&view, &edges);
        if pending.is_empty() || started.elapsed() >= limit {
            daemon::show!("{}", purge_lines(&view, &edges));
            if pending.is_empty() {
                return Ok(());
            }
            return Err(CliError::Failed(format!(
                "purge {} not applied within {}s by {}",
                answer.seq,
                limit.as_secs(),
                pending.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connected edges that have not applied the purge yet.
pub fn pending_edges(view: &PurgeView, edges: &[EdgeView]) -> Vec<String> {
    edges
        .iter()
        .filter(|e| e.connected)
        .filter(|e| {
            view.edges
                .get(&e.id)
                .is_none_or(|p| p.applied_at_us.is_none())
        })
        .map(|e| e.id.clone())
        .collect()
}

/// One line per edge: when it applied the purge (ms after the coordinator received it),
/// or why not yet.
pub fn purge_lines(view: &PurgeView, edges: &[EdgeView]) -> String {
    let mut out = String::new();
    for e in edges {
        let progress = view.edges.get(&e.id);
        let state = match progress.and_then(|p| p.applied_at_us) {
            Some(at) => format!(
                "applied {:.1} ms after receipt",
                at.saturating_sub(view.received_at_us) as f64 / 1000.0
            ),
            None if !e.connected => "not applied: disconnected".into(),
            None => "not applied yet".into(),
        };
        let note = progress
            .and_then(|p| p.error.as_deref())
            .map(|m| format!("  ({m})"))
            .unwrap_or_default();
        out.push_str(&format!("  {:<24} {:<16} {state}{note}\n", e.id, e.region));
    }
    out
}

/// `warm start`: queue the job, print its id; with `wait`, follow it to the end.
pub async fn warm_start(
    api: &ApiClient,
    spec: &coordinator::warm::job::JobSpec,
    wait: bool,
) -> Result<(), CliError> {
    let started: WarmStarted = api.call("POST", "/api/v1/warm/jobs", Some(spec)).await?;
    daemon::say!("{}", started.id);
    if wait {
        warm_follow(api, started.id).await?;
    }
    Ok(())
}

/// Polls the job until it ends, drawing one progress line per region (a bar on a tty).
async fn warm_follow(api: &ApiClient, id: u64) -> Result<(), CliError> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut drawn = 0usize;
    let mut last_plain = Instant::now() - Duration::from_secs(60);
    loop {
        let job: JobView = api
            .call("GET", &format!("/api/v1/warm/jobs/{id}"), NO_BODY)
            .await?;
        let lines = warm_lines(&job);
        let finished = job.state.is_final();
        if tty {
            let mut err = std::io::stderr();
            if drawn > 0 {
                let _ = write!(err, "\x1b[{drawn}A");
            }
            for l in &lines {
                let _ = writeln!(err, "\x1b[2K{l}");
            }
            drawn = lines.len();
        } else if finished || last_plain.elapsed() >= Duration::from_secs(5) {
            for l in &lines {
                eprintln!("{l}");
            }
            last_plain = Instant::now();
        }
        match job.state {
            JobState::Done => return Ok(()),
            JobState::Failed => {
                return Err(CliError::Failed(format!(
                    "warm job {id} failed: {}",
                    job.error.as_deref().unwrap_or("unknown error")
                )))
            }
            JobState::Cancelled => {
                return Err(CliError::Failed(format!("warm job {id} was cancelled")))
            }
            JobState::Queued | JobState::Running => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
        }
    }
}

/// One line for the job and one per region: `[=====     ] done/total errors ETA`.
pub fn warm_lines(job: &JobView) -> Vec<String> {
    let mut lines = vec![format!(
        "job {} {}: {} URLs x {} variations{}{}",
        job.id,
        job.state.as_str(),
        job.urls,
        job.variations,
        if job.tiered { ", tiered" } else { "" },
        job.rate
            .map(|r| format!(", origin {r:.1}/{:.1} req/s", job.budget))
            .unwrap_or_default()
    )];
    let width = job.regions.keys().map(String::len).max().unwrap_or(0);
    for (name, p) in &job.regions {
        let filled = (p.done * 30).checked_div(p.total).unwrap_or(0) as usize;
        let eta = match (p.status, p.eta_s) {
            (_, Some(s)) => format!("  ETA {s}s"),
            (RegionStatus::Dropped, _) => format!(
                "  dropped: {}",
                p.error.as_deref().unwrap_or("no reason recorded")
            ),
            (RegionStatus::Done, _) => "  done".into(),
            (RegionStatus::Waiting, _) => "  waiting".into(),
            (RegionStatus::Warming, None) => String::new(),
        };
        lines.push(format!(
            "  {name:<width$} [{}{}] {:>6}/{:<6} errors {}{eta}",
            "=".repeat(filled),
            " ".repeat(30 - filled.min(30)),
            p.done,
            p.total,
            p.errors
        ));
    }
    lines
}

/// `warm status [ID]`.
pub async fn warm_status(api: &ApiClient, id: Option<u64>) -> Result<(), CliError> {
    match id {
        Some(id) => {
            let job: JobView = api
                .call("GET", &format!("/api/v1/warm/jobs/{id}"), NO_BODY)
                .await?;
            for l in warm_lines(&job) {
                daemon::say!("{l}");
            }
            if let Some(e) = &job.error {
                daemon::say!("  error: {e}");
            }
        }
        None => {
            let all: JobList = api.call("GET", "/api/v1/warm/jobs", NO_BODY).await?;
            daemon::say!(
                "{:>5}  {:<10} {:<10} {:>8}  progress",
                "id",
                "state",
                "kind",
                "urls"
            );
            for job in &all.jobs {
                let (done, total) = job
                    .regions
                    .values()
                    .fold((0, 0), |(d, t), p| (d + p.done, t + p.total));
                let kind = match &job.source {
                    coordinator::warm::job::JobSource::Api => "api",
                    coordinator::warm::job::JobSource::Schedule(_) => "schedule",
                    coordinator::warm::job::JobSource::Rewarm => "rewarm",
                    coordinator::warm::job::JobSource::Refresh => "refresh",
                };
                daemon::say!(
                    "{:>5}  {:<10} {:<10} {:>8}  {done}/{total}",
                    job.id,
                    job.state.as_str(),
                    kind,
                    job.urls
                );
            }
        }
    }
    Ok(())
}

/// `warm cancel ID`.
pub async fn warm_cancel(api: &ApiClient, id: u64) -> Result<(), CliError> {
    let job: JobView = api
        .call("POST", &format!("/api/v1/warm/jobs/{id}/cancel"), NO_BODY)
        .await?;
    daemon::say!("job {id}: {}", job.state.as_str());
    Ok(())
}

/// No request body (`call`'s `body` for GETs and body-less POSTs).
pub const NO_BODY: Option<&()> = None;

#[cfg(test)]
mod tests {
    #[test]
    fn an_audit_line_shows_what_was_asked_and_what_came_of_it() {
        let listed: coordinator::audit::Listed = serde_json::from_value(serde_json::json!({
            "partial": false,
            "entries": [
                {"id": "1-c-0", "at_ms": 1_765_000_000_000u64, "coordinator": "c", "token": "deploy-pipeline",
                 "source": "10.0.0.5", "action": "config.push", "method": "POST", "path": "/api/v1/config",
                 "asked": {"query": "canary=true"}, "status": 200,
                 "result": {"version": "abc123", "new_version": true, "rollout": {"id": 7}}},
                {"id": "2-c-1", "at_ms": 1_765_000_000_000u64, "coordinator": "c", "token": null,
                 "source": "10.0.0.6", "action": "purge", "method": "POST", "path": "/api/v1/purges",
                 "status": 401, "result": {"error": "missing bearer token"}}
            ]
        }))
        .expect("listed");
        let text = super::audit_lines(&listed);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].contains("deploy-pipeline") && lines[1].contains("config.push"),
            "{text}"
        );
        assert!(
            lines[1].ends_with(r#"{"query":"canary=true"} -> new_version=true version=abc123"#),
            "{text}"
        );
        assert!(
            lines[2].contains(" -  ") && lines[2].ends_with("missing bearer token"),
            "{text}"
        );
    }

    use super::*;
    use coordinator::monitor::Health;
    use serde_json::json;

    #[test]
    fn wait_lines_say_what_is_done_or_failed_and_a_401_names_the_token_file() {
        let edge = |id: &str, active: &str| {
            json!({"id": id, "region": "eu", "connected": true, "state": "in_sync",
                   "target_version": "abc", "active_version": active, "active_vcl": null,
                   "drift": false, "drift_events": 0, "error": null,
                   "health_status": null, "health_error": null})
        };
        let view = |phase: &str, waiting: Option<&str>, error: Option<&str>| -> BundleView {
            serde_json::from_value(json!({
                "desired": "abc", "current": "abc", "waiting": waiting,
                "rollout": {"id": 3, "version": "abc", "previous": null, "phase": phase,
                            "canary_region": null, "started_at_ms": 0,
                            "canary_healthy_since_ms": null, "finished_at_ms": null,
                            "error": error, "kind": "push"},
                "canary_region": null, "canary_wait_s": 10, "drift_policy": "enforce",
                "edges": [edge("e1", "abc"), edge("e2", "old")]
            }))
            .expect("view")
        };
        let line = |v: &BundleView| progress_line(v, v.rollout.as_ref().expect("rollout"));
        assert_eq!(
            line(&view("done", None, None)),
            "done: version abc on 1 of 2 edge(s)"
        );
        assert_eq!(
            line(&view(
                "failed",
                None,
                Some("e2 (eu): main.vcl:3: Syntax error")
            )),
            "failed: version abc: e2 (eu): main.vcl:3: Syntax error"
        );
        assert_eq!(
            line(&view(
                "canary",
                Some("canary eu healthy for 4s of 10s"),
                None
            )),
            "canary: canary eu healthy for 4s of 10s"
        );
        for (had, hint) in [(false, "--token-file FILE"), (true, "--token-file")] {
            let e = api_error(401, "missing or invalid token".into(), had).to_string();
            assert!(
                e.starts_with("401: missing or invalid token (") && e.contains(hint),
                "{e}"
            );
        }
        assert_eq!(api_error(404, "no".into(), false).to_string(), "404: no");
    }

    #[test]
    fn status_table_shows_every_region() {
        let regions = json!([
            {"name": "eu-west", "health": "up", "edges": 2, "edges_connected": 2,
             "hit_ratio": {"m1": 0.9, "m5": 0.875, "h1": null}, "requests_per_s": 12.5,
             "objects": 40, "purge_lag": 0},
            {"name": "us-east", "health": "down", "diagnosis": "agent_lost", "edges": 1,
             "edges_connected": 0, "hit_ratio": {"m1": null, "m5": null, "h1": null},
             "requests_per_s": null, "objects": null, "purge_lag": 7, "stats_stale": true}
        ]);
        let regions: Vec<RegionView> = serde_json::from_value(regions).expect("regions");
        let t = status_table(&regions);
        assert!(t.lines().count() == 3, "{t}");
        assert!(
            t.contains("eu-west") && t.contains("90.0%") && t.contains("87.5%"),
            "{t}"
        );
        assert!(
            t.contains("us-east") && t.contains("down") && t.contains("0/1"),
            "{t}"
        );
        // Columns line up: the WHY column starts at the same place on every row.
        let at: Vec<Option<usize>> = t
            .lines()
            .map(|l| l.find("WHY").or_else(|| l.find("agent_lost")))
            .collect();
        assert_eq!(at[0], at[2], "{t}");
        assert_eq!(status_code(&regions), 2);
        let mut two = regions.clone();
        two[1].health = Health::Degraded;
        assert_eq!(status_code(&two), 1);
        assert_eq!(status_code(&regions[..1]), 0);
        // A region the coordinator cannot see is UNKNOWN (3), never CRITICAL; a down
        // or degraded one still wins.
        let mut blind = regions.clone();
        blind[1].health = Health::Unknown;
        assert_eq!(status_code(&blind), 3);
        blind[0].health = Health::Degraded;
        assert_eq!(status_code(&blind), 1);
        blind[0].health = Health::Down;
        assert_eq!(status_code(&blind), 2);
        // A drained region shows as drained and does not count in the code.
        let mut drained = regions.clone();
        drained[1].drained = true;
        drained[1].drain = Some(coordinator::api::views::Drain {
            by: "api".into(),
            reason: Some("kernel".into()),
            at_ms: 0,
            until_ms: None,
        });
        let t = status_table(&drained);
        assert!(t.contains("drained agent_lost"), "{t}");
        assert!(t.contains("us-east: drained by api: kernel"), "{t}");
        assert_eq!(status_code(&drained), 0);
    }

    #[test]
    fn diff_shows_changed_files_only() {
        let mut a = Bundle {
            files: Default::default(),
        };
        a.files
            .insert("main.vcl".into(), "vcl 4.1;\nsub x {}\n".into());
        a.files.insert("waf.toml".into(), "".into());
        let mut b = a.clone();
        b.files
            .insert("main.vcl".into(), "vcl 4.1;\nsub y {}\n".into());
        let d = diff(&a, &b, "v1", "v2");
        assert!(
            d.contains("--- v1/main.vcl") && d.contains("+++ v2/main.vcl"),
            "{d}"
        );
        assert!(d.contains("-sub x {}") && d.contains("+sub y {}"), "{d}");
        assert!(!d.contains("waf.toml"));
        assert_eq!(diff(&a, &a, "v1", "v1"), "");
    }
}
