//! The daemon's Unix socket: accepts connections, checks the peer, reads one request line,
//! queues or reports, replies. Queue commits run on tokio's blocking pool, never on its
//! workers; nothing here uploads.
use super::Shared;
use crate::handoff::protocol::{EnqueueReply, MAX_REQUEST, Request, one_line, rejection, truncate};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Connections served at once. A hook connection lasts about a millisecond; 64 covers
/// every build slot of a large builder at once, and bounds the tasks and buffers a flood
/// of connections can make. Past it a client is told the daemon is busy (the hook spools).
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request: a hook sends it at once; a peer that
/// holds a connection open without writing must not hold a connection slot for long.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Who may talk to the daemon.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeerPolicy {
    own_uid: u32,
    /// With a socket group, the kernel already checked the peer against the socket's 0660
    /// mode (supplementary groups included, which peer credentials do not show).
    group: Option<u32>,
}

impl PeerPolicy {
    pub(super) fn new(group: Option<u32>) -> Self {
        PeerPolicy {
            own_uid: rustix::process::getuid().as_raw(),
            group,
        }
    }
    fn allows(&self, uid: u32) -> bool {
        uid == 0 || uid == self.own_uid || self.group.is_some()
    }
}

/// Serves hand-offs and status requests on `listener` until `stop` changes.
pub(super) async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    policy: PeerPolicy,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let handle = move |stream| {
        let shared = shared.clone();
        async move { handle(stream, &shared, policy).await }
    };
    let busy = |stream: UnixStream| {
        let _ = stream.try_write(b"ERR the daemon is busy (too many connections)\n");
    };
    super::accept::serve("socket", listener, MAX_CONNECTIONS, stop, handle, busy).await;
}

async fn handle(stream: UnixStream, shared: &Arc<Shared>, policy: PeerPolicy) {
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            tracing::warn!("cannot read the peer's credentials: {e}");
            return;
        }
    };
    let (read, mut write) = stream.into_split();
    let reply = if policy.allows(uid) {
        let mut reader = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
        let mut line = Vec::new();
        match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => format!("ERR no request within {READ_TIMEOUT:?}\n"),
            Ok(Err(e)) => {
                tracing::debug!("reading a request from uid {uid}: {e}");
                return;
            }
            Ok(Ok(_)) => answer(line, shared, uid).await,
        }
    } else {
        tracing::warn!("refused a connection from uid {uid}");
        format!("ERR uid {uid} may not use this daemon\n")
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(reply.as_bytes())).await;
}

/// The reply to one request line.
async fn answer(line: Vec<u8>, shared: &Arc<Shared>, uid: u32) -> String {
    let refuse = |why: String| {
        tracing::warn!("bad request from uid {uid}: {why}");
        EnqueueReply::Err(why).to_lines()
    };
    if line.len() > MAX_REQUEST {
        return refuse(format!("request longer than {MAX_REQUEST} bytes"));
    }
    if line.last() != Some(&b'\n') {
        return refuse("incomplete request (no newline before the connection closed)".into());
    }
    let text = match String::from_utf8(line) {
        Ok(t) => t,
        Err(_) => return refuse("request is not UTF-8".into()),
    };
    match Request::parse(&text) {
        Err(why) => refuse(why),
        Ok(Request::Status) => {
            let shared = shared.clone();
            match tokio::task::spawn_blocking(move || shared.status()).await {
                Ok(Ok(status)) => format!("OK {}\n", status.to_json()),
                Ok(Err(e)) => format!("ERR {}\n", one_line(&e.to_string())),
                Err(e) => format!("ERR {}\n", one_line(&e.to_string())),
            }
        }
        Ok(Request::Enqueue { drv, paths }) => {
            let shared = shared.clone();
            let n = paths.len();
            let r = tokio::task::spawn_blocking(move || shared.enqueue(drv.as_deref(), &paths))
                .await
                .unwrap_or_else(|e| EnqueueReply::Err(e.to_string()));
            if let EnqueueReply::Ok { rejected, .. } = &r {
                for (token, why) in rejected {
                    tracing::warn!(
                        "uid {uid}: not queued: {}",
                        rejection(truncate(token, 200), why)
                    );
                }
            }
            tracing::debug!(
                "uid {uid}: ENQUEUE of {n} paths: {}",
                r.to_lines().trim_end()
            );
            r.to_lines()
        }
    }
}
