//! The HTTP boot server (axum): iPXE scripts, iPXE binaries, `/boot/*` and `/images/*` with
//! HEAD and Range, the installer's done callback, `/healthz` and `/metrics` (Prometheus text of
//! the DHCP services, `corral_dhcp::metrics`, the TFTP servers, `corral_tftp::metrics`, and this
//! server's own requests and bytes, `http::metrics`). Every request is an event
//! (source `http`) with the machine's boot session. Connections are bounded in number and
//! closed when idle ([`guard`]).

pub mod guard;
mod metrics;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use axum::serve::IncomingStream;
use corral_model::{MacAddr, Outcome, Source};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::{Netboot, kinds};
use crate::error::NetbootError;
use crate::files::{self, PathRefused, RangeAnswer};
use metrics::HttpMetrics;

/// Both ends of an HTTP connection: the peer identifies the machine, the local address is
/// what absolute URLs point at.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    /// The client.
    pub peer: SocketAddr,
    /// Our address it connected to.
    pub local: SocketAddr,
}

impl Connected<IncomingStream<'_, guard::Guarded>> for Conn {
    fn connect_info(stream: IncomingStream<'_, guard::Guarded>) -> Self {
        let peer = *stream.remote_addr();
        let local = stream
            .io()
            .get_ref()
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        Conn { peer, local }
    }
}

/// The router, for tests and for [`serve`]. Each router counts its own requests (see
/// `http::metrics`).
pub fn router(engine: Arc<Netboot>) -> Router {
    let counters = Arc::new(HttpMetrics::default());
    let scrape = counters.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let m = scrape.clone();
                async move { prometheus(&m) }
            }),
        )
        .route("/ipxe/{mac}", get(script))
        .route("/ipxe-bin/{file}", files(Root::Ipxe))
        .route("/boot/{*path}", files(Root::Boot))
        .route("/images/{*path}", files(Root::Images))
        .route("/api/v1/machines/{mac}/done", get(done).post(done))
        .fallback(fallback)
        .with_state(engine)
        .layer(axum::middleware::from_fn_with_state(
            counters,
            metrics::count,
        ))
}

/// Serves HTTP on an already bound listener until `cancel`, with the default connection
/// limits ([`guard::Limits`]).
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Netboot>,
    cancel: CancellationToken,
) -> Result<(), NetbootError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tracing::info!(%addr, "HTTP boot server listening");
    axum::serve(
        guard::Guarded::new(listener, guard::Limits::default()),
        router(engine).into_make_service_with_connect_info::<Conn>(),
    )
    .with_graceful_shutdown(async move { cancel.cancelled().await })
    .await
    .map_err(|source| NetbootError::Io {
        op: "serving HTTP on",
        path: PathBuf::from(addr.to_string()),
        source,
    })
}

fn local_v4(c: &Conn) -> Ipv4Addr {
    match c.local.ip() {
        IpAddr::V4(v) => v,
        IpAddr::V6(v) => v.to_ipv4_mapped().unwrap_or(Ipv4Addr::LOCALHOST),
    }
}

fn peer_ip(c: &Conn) -> IpAddr {
    match c.peer.ip() {
        IpAddr::V6(v) => v.to_ipv4_mapped().map_or(IpAddr::V6(v), IpAddr::V4),
        v => v,
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Prometheus text: the DHCP services' timings and counters (see `corral_dhcp::metrics`), the
/// TFTP servers' counters (`corral_tftp::metrics`), then this server's ([`metrics`]). The
/// families have distinct prefixes, so each has one HELP and TYPE line.
fn prometheus(http: &HttpMetrics) -> Response {
    let mut body = corral_dhcp::metrics::prometheus_text();
    body.push_str(&corral_tftp::metrics::prometheus_text());
    body.push_str(&http.prometheus_text());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn script(
    State(e): State<Arc<Netboot>>,
    ConnectInfo(c): ConnectInfo<Conn>,
    Path(mac): Path<String>,
) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return deny(
            &e,
            &c,
            StatusCode::BAD_REQUEST,
            format!("/ipxe/{mac}: not a MAC address"),
        );
    };
    let (peer, local) = (peer_ip(&c), local_v4(&c));
    let e2 = e.clone();
    match tokio::task::spawn_blocking(move || e2.script(mac, peer, local)).await {
        Ok(Ok(s)) => text(StatusCode::OK, s),
        Ok(Err(reason)) => text(
            StatusCode::NOT_FOUND,
            format!("#!ipxe\necho corral: {reason}\nexit 1\n"),
        ),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n".into()),
    }
}

async fn done(
    State(e): State<Arc<Netboot>>,
    ConnectInfo(c): ConnectInfo<Conn>,
    Path(mac): Path<String>,
) -> Response {
    let Ok(mac) = mac.parse::<MacAddr>() else {
        return deny(
            &e,
            &c,
            StatusCode::BAD_REQUEST,
            format!("done callback for {mac:?}: not a MAC address"),
        );
    };
    let peer = peer_ip(&c);
    let e2 = e.clone();
    match tokio::task::spawn_blocking(move || e2.done(mac, peer)).await {
        Ok(Ok(m)) => text(StatusCode::OK, format!("{m}\n")),
        Ok(Err(m)) => text(StatusCode::CONFLICT, format!("{m}\n")),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n".into()),
    }
}

fn deny(e: &Netboot, c: &Conn, status: StatusCode, reason: String) -> Response {
    let ip = peer_ip(c);
    let mac = e.mac_for_ip(ip);
    let outcome = if status == StatusCode::NOT_FOUND {
        Outcome::Fail
    } else {
        Outcome::Denied
    };
    e.recorder().record(
        e.machine_event(
            Source::Http,
            kinds::DENIED,
            outcome,
            reason.clone(),
            mac,
            Some(ip),
        )
        .with_details(serde_json::json!({ "status": status.as_u16() })),
    );
    text(status, format!("{reason}\n"))
}

async fn fallback(
    State(e): State<Arc<Netboot>>,
    ConnectInfo(c): ConnectInfo<Conn>,
    uri: Uri,
) -> Response {
    deny(
        &e,
        &c,
        StatusCode::NOT_FOUND,
        format!("no such resource {}", uri.path()),
    )
}

/// The file trees served over HTTP, each from its `[paths]` root of the current site.
#[derive(Debug, Clone, Copy)]
enum Root {
    /// `/ipxe-bin/FILE` from `[paths] ipxe`.
    Ipxe,
    /// `/boot/PATH` from `[paths] boot`.
    Boot,
    /// `/images/PATH` from `[paths] images`.
    Images,
}

impl Root {
    fn prefix(self) -> &'static str {
        match self {
            Root::Ipxe => "/ipxe-bin",
            Root::Boot => "/boot",
            Root::Images => "/images",
        }
    }

    fn dir(self, e: &Netboot) -> PathBuf {
        let site = e.site().current();
        match self {
            Root::Ipxe => site.paths.ipxe.clone(),
            Root::Boot => site.paths.boot.clone(),
            Root::Images => site.paths.images.clone(),
        }
    }
}

/// GET and HEAD (with Range) of files beneath `root`.
fn files(root: Root) -> MethodRouter<Arc<Netboot>> {
    get(
        move |State(e): State<Arc<Netboot>>,
              ConnectInfo(c): ConnectInfo<Conn>,
              method: Method,
              headers: HeaderMap,
              Path(path): Path<String>| async move {
            let dir = root.dir(&e);
            send_file(&e, &c, &method, &headers, dir, root.prefix(), &path).await
        },
    )
}

async fn send_file(
    e: &Arc<Netboot>,
    c: &Conn,
    method: &Method,
    headers: &HeaderMap,
    root: PathBuf,
    prefix: &str,
    rel: &str,
) -> Response {
    let shown = format!("{prefix}/{rel}");
    let resolved = {
        let (root, rel) = (root.clone(), rel.to_owned());
        tokio::task::spawn_blocking(move || files::resolve_beneath(&root, &rel)).await
    };
    let path = match resolved {
        Ok(Ok(p)) => p,
        Ok(Err(PathRefused::NotFound(_))) => {
            return deny(
                e,
                c,
                StatusCode::NOT_FOUND,
                format!("{shown}: no such file under {}", root.display()),
            );
        }
        Ok(Err(r)) => {
            return deny(
                e,
                c,
                StatusCode::FORBIDDEN,
                format!("{shown}: refused: {r}"),
            );
        }
        Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n".into()),
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(err) => {
            return deny(
                e,
                c,
                StatusCode::NOT_FOUND,
                format!("{shown}: cannot open: {err}"),
            );
        }
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(err) => {
            return deny(
                e,
                c,
                StatusCode::NOT_FOUND,
                format!("{shown}: cannot stat: {err}"),
            );
        }
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(RangeAnswer::Full, |h| files::parse_range(h, len));
    let ip = peer_ip(c);
    let mac = e.mac_for_ip(ip);
    let (status, start, end) = match range {
        RangeAnswer::Full => (StatusCode::OK, 0, len),
        RangeAnswer::Partial(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.end),
        RangeAnswer::Unsatisfiable => {
            let mut r = deny(
                e,
                c,
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("{shown}: range not satisfiable for {len} bytes"),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    if start > 0 && file.seek(std::io::SeekFrom::Start(start)).await.is_err() {
        return deny(
            e,
            c,
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{shown}: cannot seek"),
        );
    }
    let what = if status == StatusCode::PARTIAL_CONTENT {
        format!("bytes {start}-{} of {len}", end - 1)
    } else {
        format!("{len} bytes")
    };
    let verb = if method == Method::HEAD {
        "HEAD"
    } else {
        "GET"
    };
    e.recorder().record(
        e.machine_event(Source::Http, kinds::FILE, Outcome::Ok, format!("{verb} {shown}: {what}"), mac, Some(ip))
            .with_details(serde_json::json!({ "path": shown, "status": status.as_u16(), "start": start, "end": end, "size": len, "method": verb })),
    );
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
            file.take(end - start),
            64 * 1024,
        ))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if let (StatusCode::PARTIAL_CONTENT, Ok(v)) = (
        status,
        HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)),
    ) {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}
