//! The line protocol between `narflow hook` / `narflow status` and the daemon, and the
//! format of the hook's spool file (one request line per hand-off).
//!
//! No runtime: the hook links this (std and plain system calls only). One request per
//! connection, one line each way (an enqueue reply may be preceded by `REJECT` lines):
//!
//! ```text
//! → ENQUEUE <drv path or -> <store path> <store path> ...\n
//! ← REJECT <token> <reason>\n        (zero or more: tokens that were not queued)
//! ← OK <number queued>\n            (the queued paths are committed to disk)
//! ← ERR <reason>\n                  (nothing was queued; the hook spools instead)
//!
//! → STATUS\n
//! ← OK <JSON object>\n
//! ```
//!
//! Store paths never contain spaces or newlines, so whitespace separates tokens; a token
//! that is not a store path is rejected by the daemon, not here.

/// Longest request line the daemon reads. A post-build-hook names a handful of outputs;
/// 4 MiB holds about 40,000 store paths, and bounds what one connection can make the
/// daemon buffer. The hook spools a longer hand-off instead of sending it.
pub const MAX_REQUEST: usize = 4 << 20;

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Queue these paths (and, by the daemon, their closure) for upload.
    Enqueue {
        /// `$DRV_PATH`, when the hook had one.
        drv: Option<String>,
        paths: Vec<String>,
    },
    /// Ask for the daemon's status.
    Status,
}

impl Request {
    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        match self {
            Request::Status => "STATUS\n".to_owned(),
            Request::Enqueue { drv, paths } => {
                let drv = drv
                    .as_deref()
                    .filter(|d| is_token(d))
                    .unwrap_or("-")
                    .to_owned();
                let mut line = format!("ENQUEUE {drv}");
                for p in paths {
                    line.push(' ');
                    line.push_str(p);
                }
                line.push('\n');
                line
            }
        }
    }

    /// Parses one request line (without or with its newline).
    ///
    /// # Errors
    /// A message saying what is wrong with the line, for an `ERR` reply.
    pub fn parse(line: &str) -> Result<Request, String> {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let mut tokens = line.split_ascii_whitespace();
        match tokens.next() {
            Some("STATUS") if tokens.next().is_none() => Ok(Request::Status),
            Some("STATUS") => Err("STATUS takes no arguments".to_owned()),
            Some("ENQUEUE") => {
                let drv = match tokens.next() {
                    None => return Err("ENQUEUE needs a derivation (or -) and paths".to_owned()),
                    Some("-") => None,
                    Some(d) => Some(d.to_owned()),
                };
                Ok(Request::Enqueue {
                    drv,
                    paths: tokens.map(str::to_owned).collect(),
                })
            }
            Some(other) => Err(format!(
                "unknown request {:?} (expected ENQUEUE or STATUS)",
                truncate(other, 40)
            )),
            None => Err("empty request".to_owned()),
        }
    }
}

/// Sends one request line (see [`Request::to_line`]) to the daemon at `socket` and
/// returns its reply: everything it writes before closing the connection (it closes
/// after each reply), at most [`MAX_REQUEST`] bytes. Connecting, sending and waiting all
/// fit in `timeout` together. The client side of `narflow hook` and `narflow status`.
///
/// # Errors
/// The connection's error, `TimedOut` past the deadline (also when the daemon is stopped
/// and its backlog is full), or a reply that is too long. A daemon that refuses a request
/// may close before reading it: the write then fails, but its answer is still returned.
pub fn exchange(
    socket: &std::path::Path,
    line: &str,
    timeout: std::time::Duration,
) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Error::new(ErrorKind::TimedOut, "timed out"))
    };
    let mut s = connect_within(socket, left()?)?;
    s.set_write_timeout(Some(left()?))?;
    let wrote = s.write_all(line.as_bytes());
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(left()?))?;
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            // A daemon that closed without reading our request resets the connection
            // after its answer: what came before the reset is the answer (the callers
            // check that it is complete).
            Err(_) if !reply.is_empty() => break,
            Err(e) => return Err(wrote.err().unwrap_or(e)),
        };
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.len() > MAX_REQUEST {
            return Err(Error::other("the daemon's reply is too long"));
        }
    }
    if reply.is_empty() {
        wrote?;
    }
    String::from_utf8(reply).map_err(|_| Error::other("the daemon's reply is not UTF-8"))
}

/// Connects to `socket`, waiting at most `timeout`. A blocking connect to a Unix socket
/// whose listener does not accept (a stopped daemon) waits for room in its backlog with
/// no limit; the send timeout bounds that wait (Linux then answers EAGAIN).
fn connect_within(
    socket: &std::path::Path,
    timeout: std::time::Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType, sockopt};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(timeout))?;
    let addr = SocketAddrUnix::new(socket)?;
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the daemon accepts no connections (backlog full for {timeout:?})"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, None)?;
    Ok(std::os::unix::net::UnixStream::from(fd))
}

/// Whether a daemon is listening at `socket`, asked without waiting: `Ok(true)` when a
/// connection is accepted or the backlog is full (a live daemon that is busy or stopped),
/// `Ok(false)` when nothing listens there (a stale socket file, or none).
///
/// # Errors
/// Any other error, which says neither.
pub fn is_listening(socket: &std::path::Path) -> std::io::Result<bool> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    match rustix::net::connect(&fd, &SocketAddrUnix::new(socket)?) {
        Ok(()) | Err(rustix::io::Errno::AGAIN) => Ok(true),
        Err(rustix::io::Errno::CONNREFUSED | rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A refused token and why, in one phrase: the reason alone when it names the token
/// already (most do), else `token: reason`.
pub fn rejection(token: &str, why: &str) -> String {
    if why.contains(token) {
        why.to_owned()
    } else {
        format!("{token}: {why}")
    }
}

/// True when `s` can travel as one token.
fn is_token(s: &str) -> bool {
    !s.is_empty() && !s.contains(|c: char| c.is_ascii_whitespace())
}

/// At most `max` bytes of `s` (on a char boundary), for echoing client input in errors.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The daemon's answer to an `ENQUEUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueReply {
    /// `queued` paths are durably queued; `rejected` tokens were not, with why.
    Ok {
        queued: usize,
        rejected: Vec<(String, String)>,
    },
    /// Nothing was queued.
    Err(String),
}

impl EnqueueReply {
    /// The reply as the daemon sends it.
    pub fn to_lines(&self) -> String {
        match self {
            EnqueueReply::Ok { queued, rejected } => {
                let mut s = String::new();
                for (token, why) in rejected {
                    s.push_str(&format!("REJECT {token} {}\n", one_line(why)));
                }
                s.push_str(&format!("OK {queued}\n"));
                s
            }
            EnqueueReply::Err(why) => format!("ERR {}\n", one_line(why)),
        }
    }

    /// Parses the daemon's reply (all lines up to and including `OK`/`ERR`).
    ///
    /// # Errors
    /// A message when the text is not a complete reply.
    pub fn parse(text: &str) -> Result<EnqueueReply, String> {
        let mut rejected = Vec::new();
        for line in text.split_inclusive('\n') {
            let Some(line) = line.strip_suffix('\n') else {
                return Err(format!("incomplete reply {:?}", truncate(line, 80)));
            };
            if let Some(rest) = line.strip_prefix("REJECT ") {
                let (token, why) = rest.split_once(' ').unwrap_or((rest, ""));
                rejected.push((token.to_owned(), why.to_owned()));
            } else if let Some(n) = line.strip_prefix("OK ") {
                let queued = n
                    .parse()
                    .map_err(|_| format!("bad reply {:?}", truncate(line, 80)))?;
                return Ok(EnqueueReply::Ok { queued, rejected });
            } else if let Some(why) = line.strip_prefix("ERR ") {
                return Ok(EnqueueReply::Err(why.to_owned()));
            } else {
                return Err(format!("bad reply {:?}", truncate(line, 80)));
            }
        }
        Err("the daemon closed the connection without replying".to_owned())
    }
}

/// `s` with line breaks replaced, so it fits in one protocol line.
pub fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let r = Request::Enqueue {
            drv: Some("/nix/store/aaa-x.drv".into()),
            paths: vec!["/nix/store/bbb-x".into(), "/nix/store/ccc-x-dev".into()],
        };
        assert_eq!(
            r.to_line(),
            "ENQUEUE /nix/store/aaa-x.drv /nix/store/bbb-x /nix/store/ccc-x-dev\n"
        );
        assert_eq!(Request::parse(&r.to_line()), Ok(r));
        assert_eq!(Request::parse("STATUS\n"), Ok(Request::Status));
        // No derivation, or one that cannot travel as a token, becomes `-`.
        let r = Request::Enqueue {
            drv: Some("two words".into()),
            paths: vec!["/nix/store/bbb-x".into()],
        };
        assert_eq!(r.to_line(), "ENQUEUE - /nix/store/bbb-x\n");
        assert_eq!(
            Request::parse(&r.to_line()),
            Ok(Request::Enqueue {
                drv: None,
                paths: vec!["/nix/store/bbb-x".into()]
            })
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert!(Request::parse("").unwrap_err().contains("empty"));
        assert!(
            Request::parse("GET / HTTP/1.1")
                .unwrap_err()
                .contains("\"GET\"")
        );
        assert!(Request::parse("ENQUEUE").unwrap_err().contains("needs"));
        assert!(
            Request::parse("STATUS x")
                .unwrap_err()
                .contains("no arguments")
        );
        let long = "X".repeat(1000);
        assert!(Request::parse(&long).unwrap_err().len() < 100);
    }

    /// Connects to `sock` without accepting until its backlog is full; returns the
    /// connections (they hold the backlog).
    fn fill_backlog(sock: &std::path::Path) -> Vec<rustix::fd::OwnedFd> {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let addr = SocketAddrUnix::new(sock).unwrap();
        let mut held = Vec::new();
        loop {
            let fd = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::NONBLOCK,
                None,
            )
            .unwrap();
            match rustix::net::connect(&fd, &addr) {
                Ok(()) => held.push(fd),
                Err(rustix::io::Errno::AGAIN) => return held,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn a_daemon_that_does_not_accept_costs_at_most_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let _held = fill_backlog(&sock);
        assert!(
            is_listening(&sock).unwrap(),
            "a full backlog is a live daemon"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let s = sock.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            let r = exchange(&s, "STATUS\n", std::time::Duration::from_millis(200));
            let _ = tx.send((r, t.elapsed()));
        });
        let (r, took) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("exchange waits without bound for a full backlog");
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
        drop(_listener);
        assert!(!is_listening(&sock).unwrap(), "nobody listens any more");
    }

    #[test]
    fn replies_round_trip() {
        let r = EnqueueReply::Ok {
            queued: 2,
            rejected: vec![("/tmp/x".into(), "not in /nix/store\nsecond line".into())],
        };
        let text = r.to_lines();
        assert_eq!(text, "REJECT /tmp/x not in /nix/store second line\nOK 2\n");
        match EnqueueReply::parse(&text).unwrap() {
            EnqueueReply::Ok { queued, rejected } => {
                assert_eq!(queued, 2);
                assert_eq!(rejected[0].1, "not in /nix/store second line");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            EnqueueReply::parse("ERR disk full\n"),
            Ok(EnqueueReply::Err("disk full".into()))
        );
        assert!(EnqueueReply::parse("OK 1").is_err());
        assert!(
            EnqueueReply::parse("")
                .unwrap_err()
                .contains("without replying")
        );
        assert!(EnqueueReply::parse("HELLO\n").is_err());
    }
}
