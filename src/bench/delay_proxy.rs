//! `narflow bench delay-proxy` (hidden, for `scripts/bench-latency`): a loopback TCP proxy
//! in front of an HTTP/1.1 server that holds back each response by a fixed delay (a
//! link's round trip) and counts the requests by method.
//!
//! It prints `listening PORT` once it accepts connections (on 127.0.0.1, the port asked
//! for, or a free one), and
//! on SIGTERM or SIGINT one line of JSON with the requests seen by method (`{"GET": 12,
//! ...}`) and the connections accepted, then returns.
//!
//! With `NARFLOW_DELAY_PROXY_TIMELINE=FILE` it also writes FILE on exit: one line a
//! request, `SENT ANSWERED CONNECTION REQUEST-LINE`, times in µs since it started
//! (ANSWERED `-` for a request never answered), to see where a push's time goes.
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
    /// With `NARFLOW_DELAY_PROXY_TIMELINE` set: each request's first line, connection,
    /// and when (µs since the proxy started) it arrived and its response began.
    timeline: Option<Mutex<Vec<Exchange>>>,
    started: Option<std::time::Instant>,
}

/// One request and its response, for the timeline.
struct Exchange {
    conn: u64,
    line: String,
    sent_us: u64,
    answered_us: Option<u64>,
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

async fn serve(
    client: TcpStream,
    upstream: String,
    delay: Duration,
    counts: Arc<Counts>,
    conn: u64,
) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let state = Arc::new(std::sync::atomic::AtomicU8::new(IDLE));
    let up_state = state.clone();
    // The timeline's entry of the request awaiting its response.
    let current = Arc::new(Mutex::new(None::<usize>));
    let up_current = current.clone();
    let up_counts = counts.clone();
    let counts_down = counts.clone();
    let up = async move {
        let counts = up_counts;
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
                if let (Some(t), Some(at)) = (&counts.timeline, counts.started) {
                    let line = buf[..n].split(|&b| b == b'\r').next().unwrap_or_default();
                    let mut t = t.lock().unwrap();
                    *up_current.lock().unwrap() = Some(t.len());
                    t.push(Exchange {
                        conn,
                        line: String::from_utf8_lossy(line).into_owned(),
                        sent_us: at.elapsed().as_micros() as u64,
                        answered_us: None,
                    });
                }
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
            if state.swap(IDLE, Ordering::SeqCst) == AWAITING {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if let (Some(t), Some(at), Some(i)) = (
                    &counts_down.timeline,
                    counts_down.started,
                    current.lock().unwrap().take(),
                ) {
                    t.lock().unwrap()[i].answered_us = Some(at.elapsed().as_micros() as u64);
                }
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
    let timeline = std::env::var_os("NARFLOW_DELAY_PROXY_TIMELINE");
    let counts = Arc::new(Counts {
        timeline: timeline.is_some().then(Default::default),
        started: Some(std::time::Instant::now()),
        ..Counts::default()
    });
    let accepting = {
        let counts = counts.clone();
        let upstream = upstream.clone();
        async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let id = counts.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(conn, upstream.clone(), delay, counts.clone(), id));
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = accepting => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    if let (Some(file), Some(t)) = (timeline, &counts.timeline) {
        let lines: String = t
            .lock()
            .unwrap()
            .iter()
            .map(|e| {
                let answered = e.answered_us.map_or("-".to_owned(), |a| a.to_string());
                format!("{} {} {} {}\n", e.sent_us, answered, e.conn, e.line)
            })
            .collect();
        std::fs::write(&file, lines)?;
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
