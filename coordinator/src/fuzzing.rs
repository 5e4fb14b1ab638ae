//! Entry points for the fuzz targets (`fuzz/`) and for the test that replays their
//! corpora on every `scripts/test.sh` run. Each takes arbitrary bytes, drives the real
//! code, and panics only when a stated property breaks:
//!
//! * [`purge_request`]: the purge listener's reader and header parsing, with the input
//!   delivered in chunks the first byte chooses. Property: a request never turns into a
//!   full flush unless a header says exactly `.*`; canonical tag sets round-trip.
//! * [`purge_pattern`]: one `X-Magento-Tags-Pattern` or `X-Pool` value. Property: only
//!   `.*` flushes, tag sets round-trip, no regex is taken by default but a plain pool
//!   name, and every regex taken passes the trial match under varnish's limits.
//! * [`waf`]: the WAF compiler. Property: the VCL it emits is lexically intact (every
//!   string closes on its line, braces balance), so no rule value can break out.
//! * [`agent_message`]: a gRPC message from an agent, decoded and fed to the rollout
//!   state machine and the identity checks.
//! * [`http_head`]: the strict request-head rules both HTTP listeners share. Properties:
//!   the head's end is found the same whether the bytes arrive at once or one at a time,
//!   never beyond the limit; an accepted head has one plain `Content-Length` at most, no
//!   `Transfer-Encoding`, no CR/LF/NUL in a value, re-serialises to itself, and `httparse`
//!   (hyper's parser) reads it the same way.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use prost::Message;
use proto::edge::{agent_message, AgentMessage};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::bundle::store::BundleStore;
use crate::purge::pattern::{Policy, PurgeOp};
use crate::purge::wire::{Conn, Limits};
use crate::rollout::Rollouts;

/// Serves the fuzzer's bytes `chunk` at a time, then EOF; swallows writes.
struct Script {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
}

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self
            .chunk
            .min(self.data.len() - self.pos)
            .min(buf.remaining());
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("fuzz runtime")
    })
}

/// Bytes on the purge port.
pub fn purge_request(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let script = Script {
        data: rest.to_vec(),
        pos: 0,
        chunk: usize::from(first).max(1) * 64,
    };
    runtime().block_on(async move {
        let mut conn = Conn::new(script, Limits::default());
        for _ in 0..16 {
            let Ok(Some(request)) = conn.next_request().await else {
                return;
            };
            let policy = Policy {
                allow_regex: first & 1 == 1,
            };
            let Ok(ops) = crate::purge::listener::parse(&request, policy) else {
                continue;
            };
            let tags_header = request.header("x-magento-tags-pattern").map(|v| {
                String::from_utf8_lossy(v)
                    .trim_matches([' ', '\t'])
                    .to_owned()
            });
            for op in ops {
                match &op {
                    PurgeOp::All => assert_eq!(
                        tags_header.as_deref(),
                        Some(".*"),
                        "a full flush from something other than `.*`"
                    ),
                    PurgeOp::Tags(tags) => {
                        assert!(!tags.is_empty() && tags.iter().all(|t| !t.is_empty()));
                        let canonical: Vec<String> =
                            tags.iter().map(|t| format!("((^|,){t}(,|$))")).collect();
                        let again = crate::purge::pattern::parse_tags_pattern(
                            canonical.join("|").as_bytes(),
                            Policy::default(),
                        );
                        assert_eq!(
                            again,
                            Ok(op.clone()),
                            "canonical tag set does not round-trip"
                        );
                    }
                    PurgeOp::TagsRegex(_) => {
                        assert!(policy.allow_regex, "an opaque regex taken by default")
                    }
                    PurgeOp::PoolRegex(p) => assert!(
                        policy.allow_regex || crate::purge::pattern::is_plain_pool(p),
                        "an X-Pool regex taken by default"
                    ),
                }
                let _ = op.into_proto();
            }
        }
    });
}

/// One purge header value: the first byte picks the header (bit 0: `X-Pool`) and the
/// policy (bit 1: `allow_regex`), the rest is the value. Properties: only `.*` is a full
/// flush; a tag set round-trips through Magento's canonical form; no regex is taken by
/// default but a plain pool name; every regex taken stays within varnish's PCRE2
/// limits on the trial's worst-case subjects (a second trial agrees).
pub fn purge_pattern(data: &[u8]) {
    use crate::purge::pattern::{parse_pool, parse_tags_pattern, trial_match};
    let Some((&first, value)) = data.split_first() else {
        return;
    };
    let policy = Policy {
        allow_regex: first & 2 == 2,
    };
    let pool = first & 1 == 1;
    let parsed = if pool {
        parse_pool(value, policy)
    } else {
        parse_tags_pattern(value, policy)
    };
    let Ok(op) = parsed else {
        return;
    };
    let trimmed = String::from_utf8_lossy(value)
        .trim_matches([' ', '\t'])
        .to_owned();
    match &op {
        PurgeOp::All => assert_eq!(trimmed, ".*", "a full flush from something other than `.*`"),
        PurgeOp::Tags(tags) => {
            assert!(!pool && !tags.is_empty());
            let canonical: Vec<String> = tags.iter().map(|t| format!("((^|,){t}(,|$))")).collect();
            assert_eq!(
                parse_tags_pattern(canonical.join("|").as_bytes(), Policy::default()),
                Ok(op.clone()),
                "canonical tag set does not round-trip"
            );
        }
        PurgeOp::TagsRegex(re) => {
            assert!(
                policy.allow_regex && !pool,
                "an opaque regex taken by default"
            );
            assert_eq!(trial_match(re, "X-Magento-Tags-Pattern"), Ok(()));
        }
        PurgeOp::PoolRegex(re) => {
            assert!(pool);
            if crate::purge::pattern::is_plain_pool(re) {
                assert_eq!(
                    trial_match(re, "X-Pool"),
                    Ok(()),
                    "a plain pool name is costly"
                );
            } else {
                assert!(policy.allow_regex, "an X-Pool regex taken by default");
                assert_eq!(trial_match(re, "X-Pool"), Ok(()));
            }
        }
    }
}

/// Bytes on an HTTP listener: the first byte picks the head limit and the read chunk.
pub fn http_head(data: &[u8]) {
    use crate::http_head::{find_end, find_end_from, parse, Reader};
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let max = 64 + usize::from(first) * 256;
    let whole = find_end(rest, max);
    let mut trickled = Ok(None);
    for n in 1..=rest.len() {
        trickled = find_end_from(&rest[..n], n - 1, max);
        if trickled != Ok(None) {
            break;
        }
    }
    assert_eq!(
        whole, trickled,
        "the head's end depends on how the bytes arrived"
    );
    if let Ok(Some(end)) = whole {
        assert!(end <= max, "a head of {end} bytes passed a limit of {max}");
        if let Ok(head) = parse(&rest[..end]) {
            check_accepted(&rest[..end], &head);
        }
    }
    // The same bytes through the connection reader, pipelined heads and bodies.
    let script = Script {
        data: rest.to_vec(),
        pos: 0,
        chunk: usize::from(first % 16).max(1) * 97,
    };
    runtime().block_on(async move {
        let mut reader = Reader::new(script);
        let t = std::time::Duration::from_secs(1);
        for _ in 0..16 {
            let Ok(Some(head)) = reader.next_head(max, t, t).await else {
                return;
            };
            let len = usize::try_from(head.content_length).unwrap_or(usize::MAX);
            if len > 1 << 16 || reader.discard(len).await.is_err() {
                return;
            }
        }
    });
}

/// What every accepted head must satisfy.
fn check_accepted(bytes: &[u8], head: &crate::http_head::Head) {
    let lengths: Vec<&[u8]> = head.all("content-length").collect();
    assert!(lengths.len() <= 1, "two Content-Length accepted");
    if let Some(v) = lengths.first() {
        assert!(v.iter().all(u8::is_ascii_digit) && !v.is_empty());
        assert_eq!(
            String::from_utf8_lossy(v).parse::<u64>().ok(),
            Some(head.content_length)
        );
    } else {
        assert_eq!(head.content_length, 0);
    }
    assert!(
        head.header("transfer-encoding").is_none(),
        "Transfer-Encoding accepted"
    );
    for (name, value) in &head.headers {
        assert!(!name.is_empty() && !name.bytes().any(|b| b <= b' ' || b == b':'));
        assert!(!value.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0));
    }
    // Written out again, it reads the same.
    let mut again = format!(
        "{} {} HTTP/1.{}\r\n",
        head.method,
        head.path,
        u8::from(head.http11)
    )
    .into_bytes();
    for (name, value) in &head.headers {
        again.extend_from_slice(name.as_bytes());
        again.extend_from_slice(b": ");
        again.extend_from_slice(value);
        again.extend_from_slice(b"\r\n");
    }
    again.extend_from_slice(b"\r\n");
    assert_eq!(
        crate::http_head::parse(&again).as_ref(),
        Ok(head),
        "no round trip"
    );
    // A mainstream parser sees the same request.
    let mut fields = [httparse::EMPTY_HEADER; crate::http_head::MAX_HEADERS];
    let mut other = httparse::Request::new(&mut fields);
    match other.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, bytes.len(), "httparse ends elsewhere"),
        r => panic!("httparse reads an accepted head as {r:?}"),
    }
    assert_eq!(other.method, Some(head.method.as_str()));
    assert_eq!(other.path, Some(head.path.as_str()));
    assert_eq!(
        other.headers.len(),
        head.headers.len(),
        "a different number of fields"
    );
    for (theirs, (name, value)) in other.headers.iter().zip(&head.headers) {
        assert_eq!(theirs.name, name);
        assert_eq!(theirs.value.trim_ascii(), value.as_slice());
    }
}

/// A `waf.toml`.
pub fn waf(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(vcl) = crate::bundle::waf::compile(text) {
        if let Err(e) = check_vcl_lexically(&vcl) {
            panic!("compiled VCL is broken ({e}):\n{vcl}");
        }
    }
}

/// A minimal VCL lexer: `"..."` strings end on their line, `{"..."}` long strings end,
/// `#` and `//` comments run to the end of the line, braces balance.
pub fn check_vcl_lexically(vcl: &str) -> Result<(), String> {
    let b = vcl.as_bytes();
    let (mut i, mut depth) = (0usize, 0i64);
    while i < b.len() {
        match b[i] {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'{' if b.get(i + 1) == Some(&b'"') => {
                let end = vcl[i + 2..]
                    .find("\"}")
                    .ok_or_else(|| format!("unterminated long string at byte {i}"))?;
                i += 2 + end + 2;
                continue;
            }
            b'"' => {
                let end = vcl[i + 1..]
                    .find(['"', '\n'])
                    .ok_or_else(|| format!("unterminated string at byte {i}"))?;
                if b[i + 1 + end] == b'\n' {
                    return Err(format!("newline inside a string at byte {i}"));
                }
                i += 1 + end + 1;
                continue;
            }
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced '}}' at byte {i}"));
                }
            }
            c if c < 0x20 && c != b'\n' && c != b'\t' => {
                return Err(format!("control byte {c:#x} at {i}"))
            }
            _ => {}
        }
        i += 1;
    }
    if depth != 0 {
        return Err("unbalanced braces".into());
    }
    Ok(())
}

fn rollouts() -> &'static Arc<Rollouts> {
    static R: OnceLock<Arc<Rollouts>> = OnceLock::new();
    R.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("coordinator-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let store = Arc::new(BundleStore::open(&dir).expect("fuzz store"));
        let r = Rollouts::new(store, Default::default(), BTreeMap::new()).expect("rollouts");
        r.connect("fuzz-edge", "fuzz-region", 1, true);
        r
    })
}

/// Warming with one connected edge and a running job of 100 URLs.
fn warm() -> &'static Arc<crate::warm::Warm> {
    static W: OnceLock<Arc<crate::warm::Warm>> = OnceLock::new();
    W.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("coordinator-fuzz-warm-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let regions = vec!["fuzz-region".to_owned()];
        let w = crate::warm::Warm::open(
            crate::config::WarmConfig {
                rewarm_after_purge: true,
                ..Default::default()
            },
            "t".into(),
            regions,
            &dir,
            Arc::default(),
        )
        .expect("fuzz warm store");
        w.connect("fuzz-edge", "fuzz-region", 1);
        let spec = crate::warm::job::JobSpec {
            urls: (0..100).map(|i| format!("http://shop/p/{i}")).collect(),
            ..Default::default()
        };
        if w.create(spec, crate::warm::job::JobSource::Api).is_ok() {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() {
                rt.block_on(w.start_next());
            }
        }
        w
    })
}

/// A protobuf `AgentMessage` as it arrives on a session. Properties: nothing panics, and
/// a warm job never shows more done than total, whatever progress reports say.
pub fn agent_message(data: &[u8]) {
    let Ok(msg) = AgentMessage::decode(data) else {
        return;
    };
    let r = rollouts();
    let w = warm();
    // Hand out whatever the edge may have, so reports can match shards in flight.
    let _ = w.next_for("fuzz-edge", 1);
    match msg.msg {
        Some(agent_message::Msg::WarmProgress(p)) => w.on_progress("fuzz-edge", 1, p),
        Some(agent_message::Msg::TopUrls(t)) => {
            w.on_top("fuzz-edge", "fuzz-region", t);
            let _ = w.top(&["fuzz-region".to_owned()], 10);
        }
        Some(agent_message::Msg::Hello(h)) => {
            let _ = crate::session::validate_id(&h.edge_id, "edge_id");
            let _ = crate::session::validate_id(&h.region, "region");
        }
        Some(agent_message::Msg::ConfigStatus(s)) => r.on_status("fuzz-edge", 1, s),
        Some(agent_message::Msg::ConfigResult(res)) => r.on_result("fuzz-edge", 1, res),
        _ => {}
    }
    let _ = r.next_apply("fuzz-edge", 1);
    r.tick();
    let _ = serde_json::to_string(&r.view());
    for job in w.list(5) {
        for p in job.regions.values() {
            assert!(p.done <= p.total, "{job:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lexer_catches_breakouts() {
        assert!(check_vcl_lexically("sub x { set a = \"b\"; }").is_ok());
        assert!(check_vcl_lexically("sub x { set a = {\"b\"\n\"}; }").is_ok());
        assert!(check_vcl_lexically("sub x { set a = \"b\n\"; }").is_err());
        assert!(check_vcl_lexically("sub x { set a = \"b\"; }}").is_err());
        assert!(check_vcl_lexically("sub x { # }\n }").is_ok());
    }

    #[test]
    fn harnesses_accept_samples() {
        purge_request(
            b"\x01PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: ((^|,)cat_p_1(,|$))\r\n\r\n",
        );
        purge_request(b"\x00PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: .*\r\n\r\n");
        purge_pattern(b"\x00((^|,)cat_p_1(,|$))|((^|,)cat_c_2(,|$))");
        purge_pattern(b"\x02^([a-z0-9_,]+)+,$");
        purge_pattern(b"\x03^(a+)+$");
        purge_pattern(b"\x01^blue$");
        http_head(
            b"\x40POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.0\r\n\r\n",
        );
        http_head(b"\x40GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n");
        http_head(b"\x00GET / HTTP/1.1\r\nX-A: bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n\r\n");
        waf(include_str!("../../edge-agent/vcl/waf.toml").as_bytes());
        agent_message(&[0x82, 0x01, 0x02, 0x0a, 0x00]);
        // A WarmProgress for job 1, shard 0 (in flight once the harness handed it out).
        let progress = AgentMessage {
            msg: Some(agent_message::Msg::WarmProgress(
                proto::edge::WarmProgress {
                    job_id: 1,
                    shard: 0,
                    fetched: 20,
                    ..Default::default()
                },
            )),
        };
        agent_message(&progress.encode_to_vec());
        let done = warm().view(1).expect("job 1").regions["fuzz-region"].done;
        assert_eq!(done, 20);
    }
}
