//! The admin listener: `/metrics`, `/healthz` (the process is up) and `/readyz` (routes are
//! loaded). A deliberately small HTTP/1.1 server: one request per connection, bounded head,
//! bounded time.

use crate::metrics::{self, ControlStats};
use ringway_core::tls::CertTable;
use ringway_core::{RouteTable, WorkerStats};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest admin request head read.
const ADMIN_HEAD_BYTES_MAX: usize = 8192;
/// Time an admin client has to send its request.
const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait in the backlog.
const ADMIN_CONNECTIONS_MAX: usize = 64;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub workers: Vec<Arc<WorkerStats>>,
    pub routes: Arc<RouteTable>,
    pub certs: Arc<CertTable>,
    pub control: Arc<ControlStats>,
    pub balance: crate::balance::BalanceMetrics,
}

pub async fn serve(listener: TcpListener, state: AdminState) {
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(ADMIN_READ_TIMEOUT * 2, handle(stream, &state)).await;
            drop(permit);
        });
    }
}

async fn handle(mut s: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut buf = vec![0u8; ADMIN_HEAD_BYTES_MAX];
    let mut len = 0;
    let path = loop {
        let n = tokio::time::timeout(ADMIN_READ_TIMEOUT, s.read(&mut buf[len..]))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("/").to_string(),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => {
                respond(&mut s, 400, "text/plain", "bad request\n").await?;
                return Ok(());
            }
        }
    };
    let path = path.split('?').next().unwrap_or("/");
    match path {
        "/metrics" => {
            let mut body =
                metrics::render(&state.workers, &state.routes, &state.certs, &state.control);
            state.balance.render(&mut body);
            respond(&mut s, 200, "text/plain; version=0.0.4", &body).await
        }
        "/healthz" => respond(&mut s, 200, "text/plain", "ok\n").await,
        "/readyz" => {
            if state.routes.is_loaded() {
                respond(&mut s, 200, "text/plain", "ready\n").await
            } else {
                respond(&mut s, 503, "text/plain", "routes not loaded\n").await
            }
        }
        _ => respond(&mut s, 404, "text/plain", "not found\n").await,
    }
}

async fn respond(s: &mut TcpStream, status: u16, ctype: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}
