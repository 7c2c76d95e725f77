//! The operator's admin port: `/metrics`, `/healthz`, `/readyz` (caches synced).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves until `stop`; `ready` is set once the watches have synced.
pub async fn run(listener: TcpListener, registry: Registry, ready: Arc<AtomicBool>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
        };
        let (registry, ready) = (registry.clone(), ready.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/metrics" => {
                        let mut buf = Vec::new();
                        match TextEncoder::new().encode(&registry.gather(), &mut buf) {
                            Ok(()) => (StatusCode::OK, buf),
                            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, b"cannot encode\n".to_vec()),
                        }
                    }
                    "/healthz" => (StatusCode::OK, b"ok\n".to_vec()),
                    "/readyz" if ready.load(Ordering::Relaxed) => (StatusCode::OK, b"ready\n".to_vec()),
                    "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, b"not ready\n".to_vec()),
                    _ => (StatusCode::NOT_FOUND, b"not found\n".to_vec()),
                };
                let mut r = Response::new(Full::new(Bytes::from(body)));
                *r.status_mut() = status;
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}
