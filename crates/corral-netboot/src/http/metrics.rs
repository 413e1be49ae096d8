//! The HTTP boot server's counters, appended to `/metrics` after the DHCP and TFTP ones.
//!
//! Every request is counted once its response is ready, by route class and status; the body's
//! bytes are counted as they are handed to the connection (a client that hangs up early counts
//! only what was produced). Plain atomics: one addition per request and per body chunk. The
//! names, prefixed `corral_http_`:
//!
//! | metric | type | what |
//! |--------|------|------|
//! | `requests_total{route,code}` | counter | requests answered, by route class (`script`: `/ipxe/<mac>`, `ipxe_bin`, `boot`, `images`, `done`, `healthz`, `metrics`, `other`: anything no route serves) and HTTP status code; only pairs seen are listed |
//! | `response_bytes_total{route}` | counter | response body bytes sent, by route class (HEAD answers send none) |

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Frame, SizeHint};

/// The routes of the boot server, as the metrics group them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteClass {
    Script,
    IpxeBin,
    Boot,
    Images,
    Done,
    Healthz,
    Metrics,
    Other,
}

impl RouteClass {
    const ALL: [RouteClass; 8] = [
        RouteClass::Script,
        RouteClass::IpxeBin,
        RouteClass::Boot,
        RouteClass::Images,
        RouteClass::Done,
        RouteClass::Healthz,
        RouteClass::Metrics,
        RouteClass::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            RouteClass::Script => "script",
            RouteClass::IpxeBin => "ipxe_bin",
            RouteClass::Boot => "boot",
            RouteClass::Images => "images",
            RouteClass::Done => "done",
            RouteClass::Healthz => "healthz",
            RouteClass::Metrics => "metrics",
            RouteClass::Other => "other",
        }
    }

    /// The class of a request path (as sent, before percent-decoding), following the
    /// router's patterns: `/ipxe/{mac}`, `/ipxe-bin/{file}`, `/boot/{*path}`,
    /// `/images/{*path}`, `/api/v1/machines/{mac}/done`, `/healthz`, `/metrics`.
    pub(crate) fn of(path: &str) -> RouteClass {
        let one_segment = |rest: &str| !rest.is_empty() && !rest.contains('/');
        if path == "/healthz" {
            RouteClass::Healthz
        } else if path == "/metrics" {
            RouteClass::Metrics
        } else if path.strip_prefix("/ipxe/").is_some_and(one_segment) {
            RouteClass::Script
        } else if path.strip_prefix("/ipxe-bin/").is_some_and(one_segment) {
            RouteClass::IpxeBin
        } else if path.strip_prefix("/boot/").is_some_and(|r| !r.is_empty()) {
            RouteClass::Boot
        } else if path.strip_prefix("/images/").is_some_and(|r| !r.is_empty()) {
            RouteClass::Images
        } else if path
            .strip_prefix("/api/v1/machines/")
            .and_then(|r| r.strip_suffix("/done"))
            .is_some_and(one_segment)
        {
            RouteClass::Done
        } else {
            RouteClass::Other
        }
    }
}

/// Status codes 100..=599, one counter each per route class.
const CODES: usize = 500;

/// The counters of one HTTP boot server (one router).
#[derive(Debug)]
pub(crate) struct HttpMetrics {
    requests: Box<[[AtomicU64; CODES]; RouteClass::ALL.len()]>,
    bytes: [AtomicU64; RouteClass::ALL.len()],
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Box::new(std::array::from_fn(|_| {
                std::array::from_fn(|_| AtomicU64::new(0))
            })),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl HttpMetrics {
    fn request(&self, class: RouteClass, status: StatusCode) {
        // `StatusCode` is always within 100..=999; codes past 599 are not HTTP's and are
        // counted as 599 rather than dropped.
        let i = usize::from(status.as_u16().clamp(100, 599) - 100);
        self.requests[class as usize][i].fetch_add(1, Ordering::Relaxed);
    }

    /// The counters in the Prometheus text exposition format (version 0.0.4).
    pub(crate) fn prometheus_text(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP corral_http_requests_total HTTP boot server requests answered, by route class and status code.\n\
             # TYPE corral_http_requests_total counter\n",
        );
        for class in RouteClass::ALL {
            for (i, c) in self.requests[class as usize].iter().enumerate() {
                let n = c.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "corral_http_requests_total{{route=\"{}\",code=\"{}\"}} {n}",
                        class.label(),
                        i + 100
                    );
                }
            }
        }
        out.push_str(
            "# HELP corral_http_response_bytes_total HTTP boot server response body bytes sent, by route class.\n\
             # TYPE corral_http_response_bytes_total counter\n",
        );
        for class in RouteClass::ALL {
            let _ = writeln!(
                out,
                "corral_http_response_bytes_total{{route=\"{}\"}} {}",
                class.label(),
                self.bytes[class as usize].load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Middleware: counts the request by class and status and wraps the body to count its bytes.
pub(crate) async fn count(State(m): State<Arc<HttpMetrics>>, req: Request, next: Next) -> Response {
    let class = RouteClass::of(req.uri().path());
    let resp = next.run(req).await;
    m.request(class, resp.status());
    let (parts, inner) = resp.into_parts();
    Response::from_parts(
        parts,
        Body::new(Counted {
            inner,
            metrics: m,
            class,
        }),
    )
}

/// A response body that adds each data frame's length to its route's byte counter.
struct Counted {
    inner: Body,
    metrics: Arc<HttpMetrics>,
    class: RouteClass,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        // `Body` is `Unpin` (a boxed body), so `Counted` is too.
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.metrics.bytes[this.class as usize].fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_classes_follow_the_router_patterns() {
        let cases = [
            ("/healthz", RouteClass::Healthz),
            ("/metrics", RouteClass::Metrics),
            ("/metrics/x", RouteClass::Other),
            ("/ipxe/52:54:00:aa:00:01", RouteClass::Script),
            ("/ipxe/", RouteClass::Other),
            ("/ipxe/a/b", RouteClass::Other),
            ("/ipxe-bin/snponly.efi", RouteClass::IpxeBin),
            ("/ipxe-bin/a/b", RouteClass::Other),
            ("/boot/a/b/c", RouteClass::Boot),
            ("/boot/", RouteClass::Other),
            ("/images/disk.img", RouteClass::Images),
            ("/api/v1/machines/52-54-00-aa-00-01/done", RouteClass::Done),
            ("/api/v1/machines//done", RouteClass::Other),
            ("/api/v1/machines/a/b/done", RouteClass::Other),
            ("/", RouteClass::Other),
        ];
        for (path, want) in cases {
            assert_eq!(RouteClass::of(path), want, "{path}");
        }
    }

    #[test]
    fn text_lists_seen_status_codes_and_every_byte_counter() {
        let m = HttpMetrics::default();
        m.request(RouteClass::Boot, StatusCode::OK);
        m.request(RouteClass::Boot, StatusCode::OK);
        m.request(RouteClass::Boot, StatusCode::PARTIAL_CONTENT);
        m.request(RouteClass::Other, StatusCode::NOT_FOUND);
        m.bytes[RouteClass::Boot as usize].fetch_add(1234, Ordering::Relaxed);
        let text = m.prometheus_text();
        assert!(text.contains("corral_http_requests_total{route=\"boot\",code=\"200\"} 2\n"));
        assert!(text.contains("corral_http_requests_total{route=\"boot\",code=\"206\"} 1\n"));
        assert!(text.contains("corral_http_requests_total{route=\"other\",code=\"404\"} 1\n"));
        assert_eq!(
            text.matches("corral_http_requests_total{").count(),
            3,
            "{text}"
        );
        assert!(text.contains("corral_http_response_bytes_total{route=\"boot\"} 1234\n"));
        assert!(text.contains("corral_http_response_bytes_total{route=\"script\"} 0\n"));
        for family in ["requests_total", "response_bytes_total"] {
            assert_eq!(
                text.matches(&format!("# TYPE corral_http_{family} counter\n"))
                    .count(),
                1
            );
        }
    }
}
