//! The HTTP server: the commissioning page (`[http] listen`) and `/metrics` (there, and on
//! `[metrics] listen`), on hyper and axum.
//!
//! | path | what |
//! | --- | --- |
//! | `/` | the page (HTML; its script is `/page.js`) |
//! | `/api/status` | the gateway's state and the last taps, JSON |
//! | `/api/live` | server-sent events: `status` at once and every second, `tap` as each tap is decided |
//! | `/metrics` | Prometheus text |
//!
//! Bounded, so that no client can take what the tap path needs: at most
//! [`MAX_CONNECTIONS`] connections at a time (the rest wait in the kernel's backlog,
//! holding none of our descriptors), 5 s to send the request head, one request per
//! connection, 16 KiB of head, and 10 minutes per connection at most (a live page's
//! browser reconnects by itself). A failing `accept` (no descriptors left) backs off
//! instead of spinning. With a password file, every path asks for HTTP Basic
//! authentication (any user name); a wrong password waits a second before the answer.

use crate::ops::metrics::Metrics;
use crate::ops::status::StatusSource;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Connections served at a time, at most.
pub const MAX_CONNECTIONS: usize = 32;
const HEAD_DEADLINE: Duration = Duration::from_secs(5);
const MAX_LIFETIME: Duration = Duration::from_secs(600);
const MAX_HEAD: usize = 16 * 1024;
const LIVE_EVERY: Duration = Duration::from_secs(1);
const WRONG_PASSWORD_DELAY: Duration = Duration::from_secs(1);

const PAGE: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");

#[derive(Clone)]
struct App {
    status: StatusSource,
    metrics: Arc<Metrics>,
    /// SHA-256 of the password, when one is required.
    password: Option<[u8; 32]>,
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    /// The page, its API and `/metrics` (`[http] listen`).
    Everything,
    /// `/metrics` alone (`[metrics] listen`).
    MetricsOnly,
}

/// The routes for `serves`, reading from `status`; `password` (from `[http]
/// password_file`) protects every route.
pub fn router(status: StatusSource, password: Option<&str>, serves: Serves) -> Router {
    let app = App {
        metrics: Arc::new(Metrics::new(status.clone())),
        status,
        password: password.map(|p| Sha256::digest(p.as_bytes()).into()),
    };
    let mut routes = Router::new().route("/metrics", get(metrics));
    if serves == Serves::Everything {
        routes = routes
            .route("/", get(page))
            .route("/page.js", get(page_js))
            .route("/api/status", get(api_status))
            .route("/api/live", get(api_live));
    }
    routes
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Binds a listener now, so that a taken port is a clear start-up error.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, app: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut complained: Option<std::time::Instant> = None;
    loop {
        // Take a connection only when one can be served.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if complained.is_none_or(|t| t.elapsed().as_secs() >= 60) {
                    tracing::warn!("the HTTP server cannot take connections: {e}");
                    complained = Some(std::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_DEADLINE)
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(MAX_LIFETIME, connection).await;
        });
    }
}

/// The password from an `Authorization: Basic …` header.
fn basic_password(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Whether `headers` carry the password whose hash is `expected` (hashes are compared, so
/// the comparison's time says nothing about the password).
fn authorised(headers: &HeaderMap, expected: &[u8; 32]) -> bool {
    basic_password(headers).is_some_and(|p| Sha256::digest(&p).as_slice() == expected)
}

async fn guard(State(app): State<App>, request: Request, next: Next) -> Response {
    let mut response = match app.password {
        Some(expected) if !authorised(request.headers(), &expected) => {
            if request.headers().contains_key(header::AUTHORIZATION) {
                tokio::time::sleep(WRONG_PASSWORD_DELAY).await;
            }
            (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"id06d\", charset=\"UTF-8\"",
                )],
                "this gateway's page needs its password ([http] password_file)\n",
            )
                .into_response()
        }
        _ => next.run(request).await,
    };
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
        ),
    );
    response
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

async fn page_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        PAGE_JS,
    )
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::ops::metrics::CONTENT_TYPE)],
        app.metrics.render(),
    )
}

/// `{"status": …, "taps": [event, …]}` (the last taps oldest first), or the status alone.
fn snapshot(status: &StatusSource, with_taps: bool) -> String {
    let state = serde_json::to_string(&status.page()).unwrap_or_else(|_| "null".into());
    let mut out = format!("{{\"status\":{state}");
    if with_taps {
        out.push_str(",\"taps\":[");
        for (i, tap) in status.shared.taps.recent().iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&String::from_utf8_lossy(tap));
        }
        out.push(']');
    }
    out.push('}');
    out
}

async fn api_status(State(app): State<App>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        snapshot(&app.status, true),
    )
}

struct Live {
    status: StatusSource,
    taps: tokio::sync::broadcast::Receiver<Arc<[u8]>>,
    every: tokio::time::Interval,
    /// The whole snapshot goes first, and again after falling behind.
    resync: bool,
}

async fn api_live(State(app): State<App>) -> impl IntoResponse {
    let mut every = tokio::time::interval(LIVE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.reset();
    let live = Live {
        taps: app.status.shared.taps.subscribe(),
        status: app.status,
        every,
        resync: true,
    };
    let events = futures_util::stream::unfold(live, |mut live| async move {
        if live.resync {
            live.resync = false;
            let data = snapshot(&live.status, true);
            return Some((
                Ok::<_, std::convert::Infallible>(Event::default().event("snapshot").data(data)),
                live,
            ));
        }
        let event = tokio::select! {
            tap = live.taps.recv() => match tap {
                Ok(tap) => Event::default()
                    .event("tap")
                    .data(String::from_utf8_lossy(&tap)),
                Err(RecvError::Lagged(_)) => {
                    let data = snapshot(&live.status, true);
                    Event::default().event("snapshot").data(data)
                }
                Err(RecvError::Closed) => return None,
            },
            _ = live.every.tick() => Event::default()
                .event("status")
                .data(snapshot(&live.status, false)),
        };
        Some((Ok(event), live))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    fn basic(user_pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    }

    #[test]
    fn the_right_password_under_any_user_name_is_authorised() {
        let expected: [u8; 32] = Sha256::digest(b"s3cret:with colon").into();
        assert!(authorised(
            &with_auth(&basic("installer:s3cret:with colon")),
            &expected
        ));
        assert!(authorised(
            &with_auth(&basic(":s3cret:with colon")),
            &expected
        ));
        assert!(authorised(
            &with_auth(&basic("x:s3cret:with colon").replace("Basic", "basic")),
            &expected
        ));
    }

    #[test]
    fn a_wrong_missing_or_garbled_password_is_not() {
        let expected: [u8; 32] = Sha256::digest(b"s3cret").into();
        assert!(!authorised(&HeaderMap::new(), &expected));
        assert!(!authorised(&with_auth(&basic("u:S3cret")), &expected));
        assert!(!authorised(&with_auth(&basic("u:s3cret ")), &expected));
        assert!(!authorised(&with_auth(&basic("s3cret")), &expected));
        assert!(!authorised(&with_auth("Basic !!notbase64"), &expected));
        assert!(!authorised(&with_auth("Bearer s3cret"), &expected));
        assert!(!authorised(&with_auth("Basic"), &expected));
    }
}
