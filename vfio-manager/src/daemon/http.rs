//! The metrics endpoint: `GET /metrics` (Prometheus text) served by hyper. A
//! scraper needs one connection now and then, so the endpoint keeps few and short:
//! at most [`MAX_CONNECTIONS`] at once (one more is closed at accept), headers
//! within [`HEADER_TIMEOUT`], a whole exchange within [`CONNECTION_TIMEOUT`], and
//! the accept loop outlives every error (a flood that exhausts file descriptors
//! pauses it; it never closes the port). What the endpoint holds is bounded, so a
//! flood cannot take from the D-Bus side the descriptors its answers need.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::core::Core;

pub const MAX_CONNECTIONS: usize = 16;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `listener` for as long as the daemon runs.
pub async fn serve(core: Arc<Core>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // EMFILE and the like: wait for descriptors to come back.
                eprintln!("vfio-manager: metrics: accept failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(sock); // over the limit: closed at once, nothing held
            continue;
        };
        let core = core.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(8 << 10)
                .serve_connection(
                    TokioIo::new(sock),
                    hyper::service::service_fn(move |req| answer(core.clone(), req)),
                );
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            drop(slot);
        });
    }
}

async fn answer(
    core: Arc<Core>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let text = tokio::task::spawn_blocking(move || super::exposition(&core))
            .await
            .unwrap_or_default();
        (StatusCode::OK, text)
    } else {
        (
            StatusCode::NOT_FOUND,
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(r)
}
