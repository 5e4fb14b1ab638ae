//! The maintenance commands: `region drain NAME [--for 2h] [--reason TEXT]`, `region
//! undrain NAME`, `silence add|list|remove`, over the JSON API ([`ApiClient`]), one
//! line each; and the durations they take (`90s`, `30m`, `2h`, `1d`: [`duration_s`]).

use coordinator::api::views::{DrainAnswer, DrainRequest, Silence, SilenceList, SilenceRequest};

use crate::cli::{ApiClient, CliError, NO_BODY};

pub use crate::cli::duration_s;

use crate::cli::fmt_ms as at;

/// The path of `region`'s drain (the name percent-encoded where it must be).
fn drain_path(region: &str) -> String {
    let name: String = region
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("/api/v1/regions/{name}/drain")
}

/// The line `region drain` and `region undrain` print.
pub fn drain_line(answer: &DrainAnswer) -> String {
    match (&answer.drain, answer.drained) {
        (Some(d), true) => format!(
            "{} drained by {} {}{}: routing and DNS send it nobody, its alerts are held",
            answer.region,
            d.by,
            d.until_ms.map_or_else(
                || "until undrained".to_owned(),
                |u| format!("until {}", at(u))
            ),
            d.reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
        ),
        (Some(d), false) => format!(
            "{} undrained (drained by {} since {}): back in routing once healthy",
            answer.region,
            d.by,
            at(d.at_ms)
        ),
        (None, _) => format!("{} was not drained", answer.region),
    }
}

/// `region drain NAME [--for S] [--reason TEXT]`.
pub async fn drain(
    api: &ApiClient,
    region: &str,
    for_s: Option<u64>,
    reason: Option<String>,
) -> Result<(), CliError> {
    let body = DrainRequest { reason, for_s };
    let answer: DrainAnswer = api.call("POST", &drain_path(region), Some(&body)).await?;
    daemon::say!("{}", drain_line(&answer));
    Ok(())
}

/// `region undrain NAME`.
pub async fn undrain(api: &ApiClient, region: &str) -> Result<(), CliError> {
    let answer: DrainAnswer = api.call("DELETE", &drain_path(region), NO_BODY).await?;
    daemon::say!("{}", drain_line(&answer));
    Ok(())
}

/// One silence on one line.
pub fn silence_line(s: &Silence) -> String {
    format!(
        "silence {}: region {}, diagnosis {}, by {}, until {}{}",
        s.id,
        s.region.as_deref().unwrap_or("any"),
        s.diagnosis.as_deref().unwrap_or("any"),
        s.by,
        at(s.until_ms),
        s.reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
    )
}

/// `silence add [--region R] [--diagnosis D] --for S [--reason T]`.
pub async fn silence_add(api: &ApiClient, request: &SilenceRequest) -> Result<(), CliError> {
    if request.region.is_none() && request.diagnosis.is_none() {
        return Err(CliError::Usage(
            "give --region, --diagnosis or both (what the silence matches)".into(),
        ));
    }
    let s: Silence = api.call("POST", "/api/v1/silences", Some(request)).await?;
    daemon::say!("{}", silence_line(&s));
    Ok(())
}

/// `silence list`.
pub async fn silence_list(api: &ApiClient) -> Result<(), CliError> {
    let list: SilenceList = api.call("GET", "/api/v1/silences", NO_BODY).await?;
    if list.silences.is_empty() {
        daemon::say!("no silences in force");
    }
    for s in &list.silences {
        daemon::say!("{}", silence_line(s));
    }
    Ok(())
}

/// `silence remove ID`.
pub async fn silence_remove(api: &ApiClient, id: &str) -> Result<(), CliError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CliError::Usage(format!(
            "{id:?} is not a silence id (silence list shows them)"
        )));
    }
    let s: Silence = api
        .call("DELETE", &format!("/api/v1/silences/{id}"), NO_BODY)
        .await?;
    daemon::say!("removed {}", silence_line(&s));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::api::views::Drain;

    #[test]
    fn durations_read_as_operators_write_them() {
        for (text, s) in [
            ("90s", 90),
            ("30m", 1800),
            ("2h", 7200),
            ("1d", 86_400),
            ("45", 45),
        ] {
            assert_eq!(duration_s(text), Ok(s), "{text}");
        }
        for bad in ["", "2x", "h", "-1h", "1.5h", "0m", "99999999999999999999d"] {
            assert!(duration_s(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_answer_is_one_line() {
        let d = Drain {
            by: "api".into(),
            reason: Some("kernel".into()),
            at_ms: 1_765_000_000_000,
            until_ms: Some(1_765_007_200_000),
        };
        let drained = DrainAnswer {
            region: "eu".into(),
            drained: true,
            drain: Some(d.clone()),
        };
        assert_eq!(
            drain_line(&drained),
            "eu drained by api until 2025-12-06T07:46:40Z (kernel): routing and DNS send it nobody, its alerts are held"
        );
        let ended = DrainAnswer {
            drained: false,
            ..drained
        };
        assert!(drain_line(&ended)
            .starts_with("eu undrained (drained by api since 2025-12-06T05:46:40Z)"));
        let none = DrainAnswer {
            region: "eu".into(),
            drained: false,
            drain: None,
        };
        assert_eq!(drain_line(&none), "eu was not drained");
        assert_eq!(drain_path("eu west"), "/api/v1/regions/eu%20west/drain");
    }
}
