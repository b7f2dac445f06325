//! The agent's small HTTP/1.1 servers (`/healthz`, `/metrics`, healthCheckNodePorts): each
//! answers one request per connection from its first line, which is all a probe or a scraper
//! needs, on tokio. The answers are computed by pure functions elsewhere.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::{info, warn};

/// An HTTP answer: status code and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

pub const JSON: &str = "application/json";

/// Serves `render()` as plain text (the Prometheus exposition format) at `path` on `addr`, until
/// the task is dropped.
pub async fn serve_text(
    addr: SocketAddr,
    path: &'static str,
    render: impl Fn() -> String + Clone + Send + 'static,
) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve {path}");
            return;
        }
    };
    info!(%addr, "serving {path}");
    let answer = move |p: &str| {
        if p.split('?').next() == Some(path) {
            Answer {
                status: 200,
                body: render(),
            }
        } else {
            Answer {
                status: 404,
                body: String::new(),
            }
        }
    };
    serve(listener, "text/plain; version=0.0.4; charset=utf-8", answer).await;
}

/// Answers each connection's request (first line only) with `answer(path)`.
pub async fn serve(
    listener: TcpListener,
    content_type: &'static str,
    answer: impl Fn(&str) -> Answer + Clone + Send + 'static,
) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut n = 0;
            // Read until the end of the request head (or a full buffer: a probe is small).
            while n < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(m)) => n += m,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let a = answer(path);
            let reason = match a.status {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                a.status,
                a.body.len(),
                a.body
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
