//! The maintenance endpoints: draining a region (`POST` / `DELETE
//! /api/v1/regions/{name}/drain`) and alert silences (`GET` / `POST /api/v1/silences`,
//! `DELETE /api/v1/silences/{id}`). Writes need the `admin` scope (the API's guard
//! checks it and audits them, `guard.rs`) and, in a cluster, go to the leader (a
//! follower answers 409 naming it); each is stored
//! ([`crate::maintenance`]) before it is answered, on a blocking thread, and refused at
//! once with 503 while etcd is known unreachable. Reads answer from memory.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::views::{DrainAnswer, SilenceList};
use super::{error, json_body, leader_only, ApiState};
use crate::clock::now_ms;
use crate::etcd_kv::KvError;
use crate::maintenance::{DrainRequest, SilenceRequest, StoreError};
use crate::monitor::Diagnosis;
use crate::tokens::Caller;

/// A configured region, or one the monitor knows (an edge announced it); else the 404.
#[allow(clippy::result_large_err)]
fn known_region(s: &ApiState, name: &str) -> Result<(), Response> {
    if s.state.regions.iter().any(|r| r == name) || s.state.monitor.health().contains_key(name) {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!("no region {name:?}: neither in [[regions]] nor announced by an edge"),
        ))
    }
}

/// A store failure as an answer: 409 when this coordinator no longer leads, else 503.
fn store_error(e: StoreError) -> Response {
    let status = match e {
        StoreError::Etcd(KvError::NotLeader | KvError::Deposed) => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

/// Checks leadership, then the region (the guard checked the token).
#[allow(clippy::result_large_err)]
fn admit_write(s: &ApiState, region: Option<&str>) -> Result<(), Response> {
    leader_only(s)?;
    region.map_or(Ok(()), |r| known_region(s, r))
}

/// Runs a blocking store call; a task that failed is a 500.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_error(e)),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// `POST /api/v1/regions/{name}/drain` (body optional: `{"reason": "...", "for_s": N}`).
pub(super) async fn drain(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = admit_write(&s, Some(&name)) {
        return r;
    }
    let request: DrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DrainRequest::default()
    } else {
        match json_body(
            &body,
            "body must be {\"reason\": TEXT, \"for_s\": SECONDS} (both optional)",
        ) {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    let drain = match request.check(&caller.name, now_ms()) {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let (m, region, record) = (s.state.maintenance.clone(), name.clone(), drain.clone());
    if let Err(r) = blocking(move || m.drain(&region, record)).await {
        return r;
    }
    tracing::warn!(region = %name, by = %drain.by, reason = drain.reason.as_deref().unwrap_or(""),
        until_ms = drain.until_ms, "region drained: out of routing and DNS, its alerts held");
    Json(DrainAnswer {
        region: name,
        drained: true,
        drain: Some(drain),
    })
    .into_response()
}

/// `DELETE /api/v1/regions/{name}/drain`: 200 whether or not it was drained.
pub(super) async fn undrain(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Extension(caller): Extension<Caller>,
) -> Response {
    if let Err(r) = admit_write(&s, Some(&name)) {
        return r;
    }
    let (m, region) = (s.state.maintenance.clone(), name.clone());
    let ended = match blocking(move || m.undrain(&region)).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    if ended.is_some() {
        tracing::warn!(region = %name, by = %caller.name, "region undrained: back in routing once healthy");
    }
    Json(DrainAnswer {
        region: name,
        drained: false,
        drain: ended,
    })
    .into_response()
}

/// `GET /api/v1/silences`.
pub(super) async fn silences(State(s): State<ApiState>) -> Response {
    Json(SilenceList {
        silences: s.state.maintenance.silences(now_ms()),
    })
    .into_response()
}

/// `POST /api/v1/silences` (`{"region"?, "diagnosis"?, "for_s", "reason"?}`).
pub(super) async fn silence(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = admit_write(&s, None) {
        return r;
    }
    let request: SilenceRequest = match json_body(
        &body,
        "body must be {\"region\": NAME, \"diagnosis\": NAME, \"for_s\": SECONDS, \"reason\": TEXT} (for_s and a region or diagnosis required)",
    ) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Some(r) = &request.region {
        if let Err(mut answer) = known_region(&s, r) {
            *answer.status_mut() = StatusCode::BAD_REQUEST;
            return answer;
        }
    }
    if let Some(d) = &request.diagnosis {
        if serde_json::from_value::<Diagnosis>(serde_json::Value::String(d.clone())).is_err() {
            return error(
                StatusCode::BAD_REQUEST,
                format!("unknown diagnosis {d:?}: use a name /api/v1/regions shows (edge_down, origin_down, origin_unreachable, slow, ...)"),
            );
        }
    }
    let silence = match request.check(&caller.name, now_ms()) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let (m, record) = (s.state.maintenance.clone(), silence.clone());
    match blocking(move || m.silence(record)).await {
        Ok(Ok(())) => {}
        Ok(Err(full)) => return error(StatusCode::CONFLICT, full),
        Err(r) => return r,
    }
    tracing::info!(id = %silence.id, region = silence.region.as_deref().unwrap_or("*"),
        diagnosis = silence.diagnosis.as_deref().unwrap_or("*"), by = %silence.by,
        until_ms = silence.until_ms, "alert silence added");
    Json(silence).into_response()
}

/// `DELETE /api/v1/silences/{id}`: the silence removed, 404 if none is in force.
pub(super) async fn unsilence(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
) -> Response {
    if let Err(r) = admit_write(&s, None) {
        return r;
    }
    let (m, key) = (s.state.maintenance.clone(), id.clone());
    match blocking(move || m.unsilence(&key)).await {
        Ok(Some(silence)) => {
            tracing::info!(id = %id, by = %caller.name, "alert silence removed");
            Json(silence).into_response()
        }
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no silence {id:?} in force")),
        Err(r) => r,
    }
}
