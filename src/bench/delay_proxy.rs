//! `narflow bench delay-proxy` (hidden, for `scripts/bench-latency`): a loopback TCP proxy
//! in front of an HTTP/1.1 server that holds back each response by a fixed delay (a
//! link's round trip) and counts the requests by method.
//!
//! It prints `listening PORT` once it accepts connections (on 127.0.0.1, the port asked
//! for, or a free one), and
//! on SIGTERM or SIGINT one line of JSON with the requests seen by method (`{"GET": 12,
//! ...}`) and the connections accepted, then returns.
//!
//! Each accepted connection gets its own upstream connection. It understands only as much
//! HTTP as it needs: a client sends its next request once the last response has begun (no
//! pipelining), so the first bytes from the client after a response began start a request
//! (counted by the method they begin with), and the first bytes from the server after a
//! request wait the delay before they go on; the rest of a response follows without more
//! delay. It never changes a byte.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Counts {
    by_method: Mutex<BTreeMap<String, u64>>,
    connections: AtomicU64,
}

/// Where a connection's exchange stands.
const IDLE: u8 = 0;
/// A request went upstream; its response has not begun.
const AWAITING: u8 = 1;

/// The method a request begins with, if `data` begins one (an upper-case token and a
/// space); a body sent after `100 Continue` does not.
fn method(data: &[u8]) -> Option<&str> {
    let end = data.iter().position(|&b| b == b' ')?;
    let token = &data[..end];
    (!token.is_empty() && token.len() <= 16 && token.iter().all(u8::is_ascii_uppercase))
        .then(|| std::str::from_utf8(token).ok())
        .flatten()
}

async fn serve(client: TcpStream, upstream: String, delay: Duration, counts: Arc<Counts>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let state = Arc::new(std::sync::atomic::AtomicU8::new(IDLE));
    let up_state = state.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if up_state.swap(AWAITING, Ordering::SeqCst) == IDLE
                && let Some(m) = method(&buf[..n])
            {
                *counts
                    .by_method
                    .lock()
                    .unwrap()
                    .entry(m.to_owned())
                    .or_default() += 1;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if state.swap(IDLE, Ordering::SeqCst) == AWAITING && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

/// Runs the proxy in front of `upstream` (`host:port`), listening on `port` (0: a free
/// one), until SIGTERM or SIGINT.
///
/// # Errors
/// When its runtime cannot start or it cannot listen.
pub fn delay_proxy(upstream: &str, delay: Duration, port: u16) -> std::io::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(upstream.to_owned(), delay, port))
}

async fn run(upstream: String, delay: Duration, port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening {}", listener.local_addr()?.port());
    let counts = Arc::new(Counts::default());
    let accepting = {
        let counts = counts.clone();
        let upstream = upstream.clone();
        async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                counts.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(conn, upstream.clone(), delay, counts.clone()));
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = accepting => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let by_method = counts.by_method.lock().unwrap().clone();
    let fields: Vec<String> = by_method
        .iter()
        .map(|(m, n)| format!("\"{m}\": {n}"))
        .chain(std::iter::once(format!(
            "\"connections\": {}",
            counts.connections.load(Ordering::Relaxed)
        )))
        .collect();
    println!("{{{}}}", fields.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A request begins with its method; a body sent after `100 Continue` does not.
    #[test]
    fn a_request_is_told_by_its_method() {
        assert_eq!(super::method(b"PUT /b/k HTTP/1.1\r\n"), Some("PUT"));
        assert_eq!(
            super::method(b"GET /b?list-type=2 HTTP/1.1\r\n"),
            Some("GET")
        );
        assert_eq!(super::method(b"StorePath: /nix/store/x\n"), None);
        assert_eq!(super::method(b"\x28\xb5\x2f\xfd binary"), None);
    }
}
