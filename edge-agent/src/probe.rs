//! Synthetic monitoring from this region: every check of the coordinator's
//! [`ProbePlan`] is probed through the local varnish (`edge`) and straight at the origin
//! (`origin`), and each result goes up as a [`ProbeResult`].
//!
//! A probe is one HTTP/1.1 GET on a fresh connection ([`warmer::fetch::get`]), an edge
//! probe marked as the agent's own ([`crate::mark`]), timed to
//! the first byte and to the end of the body (bounded), under the check's timeout. It fails on a connection error,
//! a timeout, an unexpected status or a missing body substring. A new plan replaces the
//! old one (the task is restarted by the session).

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::edge::{agent_message, AgentMessage, Check, ProbePlan, ProbeResult};
use tokio::sync::mpsc;

/// Runs the plan until the task is dropped.
pub async fn run(
    plan: ProbePlan,
    varnish: SocketAddr,
    synthetic: crate::synthetic::Synthetic,
    out: mpsc::Sender<AgentMessage>,
) {
    let origin: Option<SocketAddr> = if plan.origin.is_empty() {
        None
    } else {
        match tokio::net::lookup_host(&plan.origin)
            .await
            .map(|mut a| a.next())
        {
            Ok(Some(a)) => Some(a),
            _ => {
                tracing::warn!(origin = %plan.origin, "cannot resolve the origin; probing the edge only");
                None
            }
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for check in plan.checks {
        let (out, synthetic) = (out.clone(), synthetic.clone());
        tasks.spawn(async move {
            let every = Duration::from_millis(u64::from(check.interval_ms.max(100)));
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut targets = vec![("edge", varnish)];
                if let Some(o) = origin {
                    targets.push(("origin", o));
                }
                for (target, addr) in targets {
                    let result = probe(&check, target, addr).await;
                    if target == "edge" {
                        if result.status == 0 {
                            synthetic.record_failed();
                        } else {
                            synthetic.record(&result.cache.to_ascii_uppercase());
                        }
                    }
                    let msg = AgentMessage {
                        msg: Some(agent_message::Msg::Probe(result)),
                    };
                    if out.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// One probe of `check` against `addr`.
pub async fn probe(check: &Check, target: &str, addr: SocketAddr) -> ProbeResult {
    let at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut result = ProbeResult {
        check: check.name.clone(),
        target: target.to_owned(),
        at_ms,
        ..Default::default()
    };
    let timeout = Duration::from_millis(u64::from(check.timeout_ms.max(1)));
    let started = Instant::now();
    // Only requests through varnish are marked: the origin never sees the secret.
    let mark: Vec<(String, String)> = if target == "edge" {
        vec![crate::mark::header(crate::mark::Kind::Probe)]
    } else {
        Vec::new()
    };
    match warmer::fetch::get(addr, &check.path, &check.host, &mark, timeout).await {
        Err(e) => result.error = e.to_string(),
        Ok(f) => {
            result.status = u32::from(f.status);
            result.ttfb_us = micros(f.ttfb);
            result.total_us = micros(f.total);
            result.cache = f.cache.clone();
            if u32::from(f.status) != check.expect_status {
                result.error = format!("status {}, expected {}", f.status, check.expect_status);
            } else if !check.body_contains.is_empty()
                && !String::from_utf8_lossy(&f.body).contains(&check.body_contains)
            {
                result.error = format!("body does not contain {:?}", check.body_contains);
            } else {
                result.ok = true;
            }
        }
    }
    if !result.ok && result.total_us == 0 {
        result.total_us = micros(started.elapsed());
    }
    result
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn probes_time_status_body_and_failures() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nX-Magento-Cache-Debug: HIT\r\nContent-Length: 2\r\n\r\nOK")
                    .await;
            }
        });
        let mut check = Check {
            name: "health".into(),
            path: "/health_check.php".into(),
            host: "localhost".into(),
            expect_status: 200,
            body_contains: "OK".into(),
            interval_ms: 1000,
            timeout_ms: 2000,
        };
        let r = probe(&check, "edge", addr).await;
        assert!(r.ok, "{r:?}");
        assert_eq!((r.status, r.cache.as_str()), (200, "HIT"));
        assert!(r.ttfb_us > 0 && r.total_us >= r.ttfb_us);
        check.body_contains = "nope".into();
        assert!(!probe(&check, "edge", addr).await.ok);
        check.body_contains.clear();
        check.expect_status = 204;
        assert!(probe(&check, "edge", addr)
            .await
            .error
            .contains("status 200"));
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let r = probe(&check, "origin", closed).await;
        assert!(!r.ok && r.error.contains("connect"), "{r:?}");
    }
}
