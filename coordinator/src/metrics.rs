//! Prometheus metrics: one [`Registry`] (prometheus-client's), filled by the modules that
//! own the numbers, encoded on every scrape.
//!
//! This module knows no domain module. Each subsystem registers its own families when
//! the server opens its state: live counters it bumps on the hot path (the purge
//! listener's), or a [`Collector`] that reads the gauges it already keeps at scrape time
//! (per-edge lag from the edge registry, rollout phases, probe histograms), so nothing
//! is kept twice. The helpers here ([`gauge`], [`counter`], [`histogram`], [`Label`])
//! keep those collectors short and escape every label value.
//!
//! Names follow `coordinator_<what>_<unit>[_total]` with labels `region` and `edge`.
//! `/metrics` answers in the Prometheus text format (0.0.4) unless the scraper asks for
//! OpenMetrics, which is what prometheus-client writes natively ([`render`]).

use std::fmt::Write;

pub use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::encoding::{
    EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;

pub use prometheus_client::collector::Collector;
pub use prometheus_client::registry::Registry;

/// A collector that reads `source` with `encode` on every scrape: how a module exports
/// the gauges and counters it already keeps, without a second copy of them.
pub fn collector<T: Send + Sync + 'static>(
    source: T,
    encode: fn(&T, &mut DescriptorEncoder) -> std::fmt::Result,
) -> Box<dyn Collector> {
    Box::new(FromFn { source, encode })
}

struct FromFn<T> {
    source: T,
    encode: fn(&T, &mut DescriptorEncoder) -> std::fmt::Result,
}

impl<T> std::fmt::Debug for FromFn<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collector")
    }
}

impl<T: Send + Sync + 'static> Collector for FromFn<T> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        (self.encode)(&self.source, &mut encoder)
    }
}

/// A label value, escaped as the text formats require (`\`, `"`, newline).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Label<'a>(pub &'a str);

impl EncodeLabelValue for Label<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// The `region` and `edge` labels most per-edge families carry.
pub fn edge_labels<'a>(region: &'a str, edge: &'a str) -> [(&'static str, Label<'a>); 2] {
    [("region", Label(region)), ("edge", Label(edge))]
}

/// One gauge family from its samples (a family with no samples is still described).
/// Integer values (`u64`, `i64`) print as integers, `f64` as floats.
pub fn gauge<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// One counter family; `name` is the sample name, ending in `_total`.
pub fn counter<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> std::fmt::Result {
    counter_of(encoder, name, help, samples)
}

/// One counter family of float samples (sums of seconds); `name` ends in `_total`.
pub fn counter_f64<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, f64)>,
) -> std::fmt::Result {
    counter_of(encoder, name, help, samples)
}

fn counter_of<L: EncodeLabelSet, V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    let base = name.strip_suffix("_total").unwrap_or(name);
    let mut family = encoder.encode_descriptor(base, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        family
            .encode_family(&labels)?
            .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

/// A gauge family of one unlabelled sample (`name value`).
pub fn gauge_value<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> std::fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// A counter family of one unlabelled sample; `name` ends in `_total`.
pub fn counter_value(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let base = name.strip_suffix("_total").unwrap_or(name);
    encoder
        .encode_descriptor(base, help, None, MetricType::Counter)?
        .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&value, None)
}

/// A histogram's state as its owner keeps it: cumulative counts per upper bound.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSample {
    pub sum: f64,
    pub count: u64,
    /// `(le, cumulative count)`, ascending; `+Inf` is added from `count`.
    pub buckets: Vec<(f64, u64)>,
}

/// One histogram family.
pub fn histogram<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, HistogramSample)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        // prometheus-client takes per-bucket counts and accumulates them itself.
        let mut previous = 0;
        let mut buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .map(|&(le, cumulative)| {
                let own = cumulative.saturating_sub(previous);
                previous = cumulative;
                (le, own)
            })
            .collect();
        // prometheus-client writes `le="+Inf"` for f64::MAX (and "inf" for infinity).
        buckets.push((f64::MAX, h.count.saturating_sub(previous)));
        family
            .encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum, h.count, &buckets, None,
            )?;
    }
    Ok(())
}

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`: what curl, older scrapers and most tools read.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`: what Prometheus asks for first.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Encodes every registered family.
pub fn render(registry: &Registry, format: Format) -> String {
    let mut open = String::with_capacity(16 * 1024);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut open, registry) {
        tracing::error!(error = %e, "encoding the metrics failed");
    }
    match format {
        Format::OpenMetrics => open,
        Format::Prometheus => to_prometheus_text(&open),
    }
}

/// OpenMetrics text as the Prometheus 0.0.4 format: a counter family is named after its
/// samples (`x_total`, not `x`), there is no `# EOF` or `# UNIT`, and a histogram
/// bucket's `le` comes last, as the Prometheus clients write it.
fn to_prometheus_text(open: &str) -> String {
    let mut out = String::with_capacity(open.len());
    let mut help: Option<&str> = None;
    for line in open.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            continue;
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        out.push_str(&le_last(line));
        out.push('\n');
    }
    out
}

/// `x_bucket{le="0.1",region="a"} 3` as `x_bucket{region="a",le="0.1"} 3`.
fn le_last(line: &str) -> std::borrow::Cow<'_, str> {
    let Some((name, rest)) = line.split_once("{le=\"") else {
        return line.into();
    };
    let Some((le, rest)) = rest.split_once('"') else {
        return line.into();
    };
    match rest.strip_prefix(',') {
        Some(others) => match others.rsplit_once("} ") {
            Some((labels, value)) => format!("{name}{{{labels},le=\"{le}\"}} {value}").into(),
            None => line.into(),
        },
        None => line.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Sample;

    impl Collector for Sample {
        fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
            counter(
                &mut e,
                "t_things_total",
                "Things.",
                [(edge_labels("eu \"west\"", "e\\1\nx"), 3)],
            )?;
            gauge(
                &mut e,
                "t_lag_seconds",
                "Lag.",
                [([("edge", Label("a"))], 0.5)],
            )?;
            gauge_value(&mut e, "t_head_seq", "Head.", 7u64)?;
            counter_value(&mut e, "t_refused_total", "Refused.", 2)?;
            histogram(
                &mut e,
                "t_duration_seconds",
                "Time.",
                [(
                    [("check", Label("home"))],
                    HistogramSample {
                        sum: 1.5,
                        count: 4,
                        buckets: vec![(0.1, 1), (1.0, 3)],
                    },
                )],
            )
        }
    }

    fn registry() -> Registry {
        let mut r = Registry::default();
        r.register_collector(Box::new(Sample));
        r
    }

    #[test]
    fn prometheus_text_names_counters_by_their_samples_and_escapes_labels() {
        let text = render(&registry(), Format::Prometheus);
        assert!(text.contains("# HELP t_things_total Things.\n# TYPE t_things_total counter\n"));
        assert!(
            text.contains("t_things_total{region=\"eu \\\"west\\\"\",edge=\"e\\\\1\\nx\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE t_lag_seconds gauge\nt_lag_seconds{edge=\"a\"} 0.5\n"));
        assert!(
            text.contains("# TYPE t_head_seq gauge\nt_head_seq 7\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE t_refused_total counter\nt_refused_total 2\n"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn histogram_buckets_stay_cumulative() {
        let text = render(&registry(), Format::Prometheus);
        for want in [
            "t_duration_seconds_bucket{check=\"home\",le=\"0.1\"} 1\n",
            "t_duration_seconds_bucket{check=\"home\",le=\"1.0\"} 3\n",
            "t_duration_seconds_bucket{check=\"home\",le=\"+Inf\"} 4\n",
            "t_duration_seconds_sum{check=\"home\"} 1.5\n",
            "t_duration_seconds_count{check=\"home\"} 4\n",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }

    #[test]
    fn openmetrics_when_asked() {
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;version=1.0.0,*/*;q=0.1")),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        let text = render(&registry(), Format::OpenMetrics);
        assert!(text.contains("# TYPE t_things counter\n"));
        assert!(text.ends_with("# EOF\n"));
    }
}
