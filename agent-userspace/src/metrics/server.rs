//! The `/metrics` endpoint: plain HTTP/1.1 on the configured address, GET and HEAD only.
//!
//! It exposes counts and names (sandboxes, rules, credentials), never a secret, but the
//! names still say what the agents do: bind it to loopback or a management network.

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::Metrics;

/// The OpenMetrics text format, served when the client's `Accept` names it (Prometheus
/// does).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format, served to every other client (curl, `promtool`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A scrape connection that sends no complete request header within this is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrape connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// The longest one connection takes requests, whatever it does (a client that pipelines
/// requests and never reads the answers would hold its slot for ever: sixteen of them
/// would stop every scrape, and with them the alerts on the daemon's health).
#[cfg(not(test))]
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
#[cfg(test)]
const CONNECTION_LIFETIME: Duration = Duration::from_secs(1);
/// After its lifetime, how long a connection may take to finish the answer it is
/// writing before it is closed.
#[cfg(not(test))]
const CLOSING_GRACE: Duration = Duration::from_secs(10);
#[cfg(test)]
const CLOSING_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds `addr` and returns the bound address and the task serving `/metrics` (spawn it;
/// it runs until aborted).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    Ok((local, accept_loop(listener, metrics)))
}

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "Metrics listener accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, metrics.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            // Past its lifetime a connection finishes the answer it is writing, if it
            // can within the grace, and takes no more requests.
            let ended = match tokio::time::timeout(CONNECTION_LIFETIME, conn.as_mut()).await {
                Ok(ended) => Some(ended),
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSING_GRACE, conn).await.ok()
                }
            };
            match ended {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "Metrics connection ended with an error");
                }
                None => tracing::debug!(%peer, "Metrics connection closed after its lifetime"),
            }
            drop(permit);
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, text: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    };
    if req.uri().path() != "/metrics" {
        return Ok(reply(StatusCode::NOT_FOUND, "not found: try /metrics\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = reply(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let openmetrics = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    // The snapshot may wait for the daemon's lock: keep it off the runtime's workers.
    let encoded = tokio::task::spawn_blocking(move || {
        if openmetrics {
            metrics.encode()
        } else {
            metrics.encode_prometheus_text()
        }
    });
    let text = match encoded.await {
        Ok(Ok(text)) => text,
        Ok(Err(_)) | Err(_) => {
            tracing::error!("Encoding metrics failed");
            return Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            ));
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(if openmetrics {
            CONTENT_TYPE
        } else {
            TEXT_CONTENT_TYPE
        }),
    );
    Ok(resp)
}
