//! Prometheus metrics of `corral cast serve`, counted from the engine's audit events (the
//! [`Observer`] the driver already reports to), served on `--metrics ADDR` at `/metrics`.
//!
//! | series | type | what |
//! |---|---|---|
//! | `corral_cast_events_total{kind,outcome}` | counter | every audit event (image requests, sessions, receivers joining, finishing, failing) |
//! | `corral_cast_sessions_active` | gauge | sessions started and not yet ended |
//! | `corral_cast_sessions_total{outcome}` | counter | sessions ended: `ok` (every receiver verified) or `fail` |
//! | `corral_cast_receivers_total{result}` | counter | receivers of ended sessions: `verified` or `failed` |
//! | `corral_cast_image_bytes_total` | counter | image bytes of ended sessions |
//! | `corral_cast_sent_bytes_total` | counter | bytes put on the wire by ended sessions |
//! | `corral_cast_sent_packets_total{kind}` | counter | datagrams of ended sessions: `all`, `source` (the in-order pass), `repair` (parity) |
//! | `corral_cast_unicast_moves_total` | counter | receivers moved to TCP catch-up |
//!
//! Per-session figures are added when the session ends (its `session-end` event carries the
//! sender's report), so a scrape never sees a half-counted session.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use corral_cast::{CancellationToken, Observer, Progress};
use corral_model::prometheus::escape_label;
use corral_model::{Event, SessionId};

/// The counters.
#[derive(Debug, Default)]
pub(crate) struct CastMetrics {
    inner: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    events: BTreeMap<(String, String), u64>,
    active: HashSet<SessionId>,
    sessions: BTreeMap<String, u64>,
    receivers_verified: u64,
    receivers_failed: u64,
    image_bytes: u64,
    bytes_sent: u64,
    packets_sent: u64,
    source_packets: u64,
    repair_packets: u64,
    moved_to_unicast: u64,
}

impl CastMetrics {
    /// Counts one audit event.
    pub(crate) fn record(&self, e: &Event) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *c.events
            .entry((e.kind.as_str().to_owned(), e.outcome.to_string()))
            .or_default() += 1;
        match e.kind.as_str() {
            "session-start" => {
                if let Some(s) = e.session {
                    c.active.insert(s);
                }
            }
            "session-end" => {
                if let Some(s) = &e.session {
                    c.active.remove(s);
                }
                *c.sessions.entry(e.outcome.to_string()).or_default() += 1;
                let d = &e.details;
                let n = |k: &str| d.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
                c.image_bytes += n("image_bytes");
                c.bytes_sent += n("bytes_sent");
                c.packets_sent += n("packets_sent");
                c.source_packets += n("source_packets");
                c.repair_packets += n("repair_packets");
                c.moved_to_unicast += n("moved_to_unicast");
                for r in d
                    .get("receivers")
                    .and_then(serde_json::Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if r.get("ok").and_then(serde_json::Value::as_bool) == Some(true) {
                        c.receivers_verified += 1;
                    } else {
                        c.receivers_failed += 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// The text exposition format.
    pub(crate) fn prometheus_text(&self) -> String {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let simple =
            |out: &mut String, name: &str, kind: &str, help: &str, lines: &[(&str, u64)]| {
                let _ = writeln!(out, "# HELP corral_cast_{name} {help}");
                let _ = writeln!(out, "# TYPE corral_cast_{name} {kind}");
                for (labels, v) in lines {
                    let _ = writeln!(out, "corral_cast_{name}{labels} {v}");
                }
            };
        simple(
            &mut out,
            "events_total",
            "counter",
            "Audit events of the cast server, by kind and outcome.",
            &[],
        );
        for ((kind, outcome), n) in &c.events {
            let _ = writeln!(
                out,
                "corral_cast_events_total{{kind=\"{}\",outcome=\"{}\"}} {n}",
                escape_label(kind),
                escape_label(outcome)
            );
        }
        simple(
            &mut out,
            "sessions_active",
            "gauge",
            "Sessions started and not yet ended.",
            &[("", c.active.len() as u64)],
        );
        let ok = c.sessions.get("ok").copied().unwrap_or(0);
        let fail = c.sessions.get("fail").copied().unwrap_or(0);
        simple(
            &mut out,
            "sessions_total",
            "counter",
            "Sessions ended: ok when every receiver verified the image.",
            &[("{outcome=\"ok\"}", ok), ("{outcome=\"fail\"}", fail)],
        );
        simple(
            &mut out,
            "receivers_total",
            "counter",
            "Receivers of ended sessions, by result.",
            &[
                ("{result=\"verified\"}", c.receivers_verified),
                ("{result=\"failed\"}", c.receivers_failed),
            ],
        );
        simple(
            &mut out,
            "image_bytes_total",
            "counter",
            "Image bytes of ended sessions.",
            &[("", c.image_bytes)],
        );
        simple(
            &mut out,
            "sent_bytes_total",
            "counter",
            "Bytes put on the wire by ended sessions.",
            &[("", c.bytes_sent)],
        );
        simple(
            &mut out,
            "sent_packets_total",
            "counter",
            "Datagrams sent by ended sessions: all, source (the in-order pass), repair (parity).",
            &[
                ("{kind=\"all\"}", c.packets_sent),
                ("{kind=\"source\"}", c.source_packets),
                ("{kind=\"repair\"}", c.repair_packets),
            ],
        );
        simple(
            &mut out,
            "unicast_moves_total",
            "counter",
            "Receivers moved to TCP catch-up because they fell behind the stream.",
            &[("", c.moved_to_unicast)],
        );
        out
    }
}

/// Forwards to the command's observer and counts every event.
pub(crate) struct MetricsObserver {
    pub(crate) inner: Arc<dyn Observer>,
    pub(crate) metrics: Arc<CastMetrics>,
}

impl Observer for MetricsObserver {
    fn event(&self, event: &Event) {
        self.metrics.record(event);
        self.inner.event(event);
    }
    fn progress(&self, progress: &Progress) {
        self.inner.progress(progress);
    }
}

/// Serves `GET /metrics` on `addr` until `cancel` fires. Binding happens before this returns,
/// so a port in use is an error the user sees at start.
pub(crate) async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<CastMetrics>,
    cancel: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics {addr}: cannot listen; pick a free address:port"))?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.prometheus_text(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        // Bounded and idle connections closed, as the netboot HTTP server's.
        let listener = corral_netboot::http::guard::Guarded::new(
            listener,
            corral_netboot::http::guard::Limits::default(),
        );
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_model::{Outcome, Source, UnixMillis};

    fn event(
        kind: &str,
        outcome: Outcome,
        session: SessionId,
        details: serde_json::Value,
    ) -> Event {
        let mut e = Event::new(UnixMillis(0), Source::Cast, kind, outcome, "test");
        e.session = Some(session);
        e.with_details(details)
    }

    fn value(text: &str, series: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{series} not in\n{text}"))
    }

    #[test]
    fn sessions_are_counted_when_they_end_from_the_senders_report() {
        let m = CastMetrics::default();
        let s1 = SessionId(1);
        let s2 = SessionId(2);
        m.record(&event(
            "session-start",
            Outcome::Info,
            s1,
            serde_json::Value::Null,
        ));
        m.record(&event(
            "session-start",
            Outcome::Info,
            s2,
            serde_json::Value::Null,
        ));
        let t = m.prometheus_text();
        assert_eq!(value(&t, "corral_cast_sessions_active"), 2);
        assert_eq!(value(&t, "corral_cast_sent_bytes_total"), 0);
        m.record(&event(
            "session-end",
            Outcome::Fail,
            s1,
            serde_json::json!({
                "image_bytes": 1000, "bytes_sent": 1100, "packets_sent": 9,
                "source_packets": 7, "repair_packets": 2, "moved_to_unicast": 1,
                "receivers": [{"name": "a", "ok": true}, {"name": "b", "ok": false}],
            }),
        ));
        let t = m.prometheus_text();
        assert_eq!(value(&t, "corral_cast_sessions_active"), 1);
        assert_eq!(value(&t, "corral_cast_sessions_total{outcome=\"fail\"}"), 1);
        assert_eq!(value(&t, "corral_cast_sessions_total{outcome=\"ok\"}"), 0);
        assert_eq!(
            value(&t, "corral_cast_receivers_total{result=\"verified\"}"),
            1
        );
        assert_eq!(
            value(&t, "corral_cast_receivers_total{result=\"failed\"}"),
            1
        );
        assert_eq!(value(&t, "corral_cast_image_bytes_total"), 1000);
        assert_eq!(value(&t, "corral_cast_sent_bytes_total"), 1100);
        assert_eq!(
            value(&t, "corral_cast_sent_packets_total{kind=\"repair\"}"),
            2
        );
        assert_eq!(value(&t, "corral_cast_unicast_moves_total"), 1);
        assert_eq!(
            value(
                &t,
                "corral_cast_events_total{kind=\"session-start\",outcome=\"info\"}"
            ),
            2
        );
        // A second end of the same session (never sent, but be safe) does not go negative.
        m.record(&event(
            "session-end",
            Outcome::Ok,
            s1,
            serde_json::json!({}),
        ));
        assert_eq!(
            value(&m.prometheus_text(), "corral_cast_sessions_active"),
            1
        );
    }
}
