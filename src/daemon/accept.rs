//! The accept loop of the daemon's listeners (its Unix socket, its metrics address): at
//! most a fixed number of connections served at once, each on a task of its own, until
//! the stop signal. It never reads or answers a request itself.
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// A listener whose connections [`serve`] accepts.
pub(super) trait Accept {
    type Stream: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Accepts connections on `listener` until `stop` changes: each goes to `handle` on a
/// task of its own while fewer than `max` are being handled, otherwise to `busy` (which
/// may answer it, and must not wait). `what` names the listener in logs.
pub(super) async fn serve<L, F, Fut>(
    what: &'static str,
    listener: L,
    max: usize,
    mut stop: watch::Receiver<bool>,
    mut handle: F,
    busy: impl Fn(L::Stream),
) where
    L: Accept,
    F: FnMut(L::Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let stream = tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // E.g. out of file descriptors: wait rather than spin.
                    tracing::warn!("{what}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let task = handle(stream);
                tokio::spawn(async move {
                    task.await;
                    drop(permit);
                });
            }
            Err(_) => busy(stream),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{UnixListener, UnixStream};

    #[tokio::test]
    async fn past_the_limit_a_connection_goes_to_busy_and_stop_ends_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let listener = UnixListener::bind(&path).unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (release_tx, release_rx) = watch::channel(false);
        let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(4);
        let handle = move |s: UnixStream| {
            let (mut release, started) = (release_rx.clone(), started_tx.clone());
            async move {
                started.send(()).await.unwrap();
                let _ = release.wait_for(|r| *r).await;
                drop(s);
            }
        };
        let busy = |s: UnixStream| {
            let _ = s.try_write(b"busy\n");
        };
        let running = tokio::spawn(serve("test", listener, 1, stop_rx, handle, busy));

        let mut first = UnixStream::connect(&path).await.unwrap();
        started_rx.recv().await.unwrap();
        let mut second = UnixStream::connect(&path).await.unwrap();
        let mut reply = String::new();
        second.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "busy\n", "the one slot is taken");

        release_tx.send(true).unwrap();
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the handler, not busy, had the first");
        stop_tx.send(true).unwrap();
        running.await.unwrap();
        assert!(started_rx.try_recv().is_err(), "only the first was handled");
    }
}
