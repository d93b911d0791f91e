//! A loopback HTTP/1.1 proxy between narflow and the S3 server that injects faults on a
//! deterministic schedule and logs every request it sees.
//!
//! It understands just enough HTTP to forward one request/response pair at a time over a
//! keep-alive connection: request heads (method, target, Content-Length, chunked bodies)
//! and response heads (status, Content-Length, chunked or read-to-close bodies, no body for
//! HEAD, 1xx, 204, 304). Each accepted connection gets a thread and its own upstream
//! connection. Only path-style requests are classified (`/bucket/key?query`), which is what
//! narflow sends to a custom endpoint.
//!
//! Faults are chosen per request by [`Rule`]s, so a schedule such as "every 5th request,
//! cycling reset / stall / 503, at most 9 times" or "every UploadPart after the third"
//! gives the same number of faults on every run.
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to a request instead of forwarding it normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Read the request head, then close the connection without forwarding anything. The
    /// head is only peeked, so the kernel finds unread data on close and sends a RST.
    Reset,
    /// Forward the request (the server does the work), then hold the response for this
    /// long and close without sending it: the client sees a read timeout.
    Stall(Duration),
    /// Forward nothing and say nothing for this long, then close.
    Silent(Duration),
    /// Read and discard the request, answer `503 Slow Down` with an S3 error body and
    /// `Retry-After: 1`, and close.
    SlowDown,
    /// Read and discard the request and answer `200 OK` with an `InternalError` body, as
    /// S3 may for CompleteMultipartUpload and CopyObject (its documentation says to
    /// retry them).
    InternalErrorIn200,
    /// Forward the request (the server does the work), then replace the server's answer
    /// with `200 OK` and a document whose root element no S3 client expects, as some
    /// S3-compatible servers answer CompleteMultipartUpload: the outcome is unknown to the
    /// client.
    UnreadableIn200,
}

impl Fault {
    pub fn is_stall(self) -> bool {
        matches!(self, Fault::Stall(_) | Fault::Silent(_))
    }
}

/// Which S3 operation a request is, as far as the schedule and the counters care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Any,
    /// Any PUT: PutObject, UploadPart, CopyObject.
    Put,
    /// PutObject of `<hash>.narinfo`.
    NarinfoPut,
    /// PutObject under `nar/` (a NAR sent in one request).
    NarPut,
    CreateMultipart,
    /// UploadPart with a body (not a copy).
    UploadPart,
    /// UploadPart copying a range of another object (UploadPartCopy).
    UploadPartCopy,
    CompleteMultipart,
    AbortMultipart,
    CopyObject,
    /// DeleteObject (not an abort).
    Delete,
    /// DeleteObjects (`POST ?delete`, many keys).
    DeleteObjects,
    Head,
    Get,
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query, as sent (`/bucket/key?x-id=PutObject`).
    pub target: String,
    /// The request carried `x-amz-copy-source` (CopyObject).
    pub copy: bool,
    /// The fault applied instead of a plain forward.
    pub fault: Option<Fault>,
    /// The server's status, when a response was forwarded to the client.
    pub status: Option<u16>,
    /// How long the server took to answer once the whole request was forwarded, for a
    /// request forwarded to it.
    pub waited: Option<Duration>,
    /// Bytes of the request's body forwarded to the server (its framing included), once
    /// the whole body went through.
    pub body_bytes: u64,
}

impl Request {
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// The object key of a path-style request (`/bucket/key` → `key`).
    pub fn key(&self) -> &str {
        let p = self.path().trim_start_matches('/');
        p.split_once('/').map_or("", |(_, k)| k)
    }

    fn has_param(&self, name: &str) -> bool {
        self.query()
            .split('&')
            .any(|kv| kv.split_once('=').map_or(kv, |(k, _)| k) == name)
    }

    pub fn is(&self, kind: Kind) -> bool {
        let m = self.method.as_str();
        let upload_id = self.has_param("uploadId");
        match kind {
            Kind::Any => true,
            Kind::Put => m == "PUT",
            Kind::NarinfoPut => {
                m == "PUT" && !self.copy && !upload_id && self.key().ends_with(".narinfo")
            }
            Kind::NarPut => {
                m == "PUT" && !self.copy && !upload_id && self.key().starts_with("nar/")
            }
            Kind::CreateMultipart => m == "POST" && self.has_param("uploads"),
            Kind::UploadPart => {
                m == "PUT" && !self.copy && upload_id && self.has_param("partNumber")
            }
            Kind::UploadPartCopy => m == "PUT" && self.copy && upload_id,
            Kind::CompleteMultipart => m == "POST" && upload_id,
            Kind::AbortMultipart => m == "DELETE" && upload_id,
            Kind::CopyObject => m == "PUT" && self.copy && !upload_id,
            Kind::Delete => m == "DELETE" && !upload_id,
            Kind::DeleteObjects => m == "POST" && self.has_param("delete"),
            Kind::Head => m == "HEAD",
            Kind::Get => m == "GET",
        }
    }
}

/// A fault rule: of the requests of `kind`, the first
/// `skip` pass; after that every `every`-th one gets the next fault of `faults`
/// (cycling), at most `limit` times.
#[derive(Debug, Clone)]
pub struct Rule {
    pub kind: Kind,
    pub skip: usize,
    pub every: usize,
    pub limit: usize,
    pub faults: Vec<Fault>,
}

impl Rule {
    /// Every `every`-th request of any kind, cycling through `faults`, `limit` times.
    pub fn every(every: usize, limit: usize, faults: &[Fault]) -> Self {
        Rule {
            kind: Kind::Any,
            skip: 0,
            every,
            limit,
            faults: faults.to_vec(),
        }
    }

    /// Every request of `kind` after the first `skip` gets `fault`, `limit` times.
    pub fn after(kind: Kind, skip: usize, limit: usize, fault: Fault) -> Self {
        Rule {
            kind,
            skip,
            every: 1,
            limit,
            faults: vec![fault],
        }
    }
}

#[derive(Debug)]
struct RuleState {
    rule: Rule,
    seen: usize,
    fired: usize,
}

#[derive(Debug)]
struct State {
    rules: Vec<RuleState>,
    log: Vec<Request>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    /// Notified whenever a request's answer is logged ([`Proxy::wait_until`]).
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    /// Logs a request and decides its fault; returns its index in the log.
    fn admit(&self, mut req: Request) -> (usize, Option<Fault>) {
        let mut st = self.state.lock().unwrap();
        let mut fault = None;
        for r in &mut st.rules {
            if !req.is(r.rule.kind) {
                continue;
            }
            r.seen += 1;
            let n = r.seen;
            if fault.is_none()
                && n > r.rule.skip
                && (n - r.rule.skip).is_multiple_of(r.rule.every.max(1))
                && r.fired < r.rule.limit
                && !r.rule.faults.is_empty()
            {
                fault = Some(r.rule.faults[r.fired % r.rule.faults.len()]);
                r.fired += 1;
            }
        }
        req.fault = fault;
        st.log.push(req);
        (st.log.len() - 1, fault)
    }

    fn set_waited(&self, i: usize, waited: Duration) {
        self.state.lock().unwrap().log[i].waited = Some(waited);
    }

    fn set_status(&self, i: usize, status: u16) {
        self.state.lock().unwrap().log[i].status = Some(status);
        self.changed.notify_all();
    }

    fn set_body_bytes(&self, i: usize, n: u64) {
        self.state.lock().unwrap().log[i].body_bytes = n;
    }
}

/// A writer that counts what goes through it.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The proxy; it stops accepting connections when dropped (open ones finish on their own).
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 (a free port) in front of `upstream`
    /// (`http://host:port`, as in `NARFLOW_TEST_S3_ENDPOINT`).
    pub fn start(upstream: &str, rules: Vec<Rule>) -> Proxy {
        let hostport = upstream
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("the proxy speaks plain http, not {upstream}"))
            .trim_end_matches('/');
        let upstream = std::net::ToSocketAddrs::to_socket_addrs(hostport)
            .unwrap_or_else(|e| panic!("{hostport}: {e}"))
            .next()
            .expect("an address");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State {
                rules: rules
                    .into_iter()
                    .map(|rule| RuleState {
                        rule,
                        seen: 0,
                        fired: 0,
                    })
                    .collect(),
                log: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("s3-proxy-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let s = s.clone();
                    std::thread::spawn(move || {
                        // Errors just end the connection, as a real network would.
                        let _ = serve(conn, &s);
                    });
                }
            })
            .unwrap();
        Proxy { shared, addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The endpoint to give narflow (`endpoint=` in the cache URL).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request seen so far, in arrival order.
    pub fn log(&self) -> Vec<Request> {
        self.shared.state.lock().unwrap().log.clone()
    }

    /// Requests of `kind` that were forwarded without a fault.
    pub fn forwarded(&self, kind: Kind) -> usize {
        self.log()
            .iter()
            .filter(|r| r.fault.is_none() && r.is(kind))
            .count()
    }

    /// Requests of `kind` forwarded and answered with a 2xx.
    pub fn succeeded(&self, kind: Kind) -> usize {
        self.log()
            .iter()
            .filter(|r| r.is(kind) && matches!(r.status, Some(200..=299)))
            .count()
    }

    /// Body bytes forwarded to the server by the requests of `log` (e.g. `&log()[n..]`)
    /// that are of `kind`.
    pub fn body_bytes(log: &[Request], kind: Kind) -> u64 {
        log.iter()
            .filter(|r| r.is(kind))
            .map(|r| r.body_bytes)
            .sum()
    }

    /// Waits until `pred` holds for the log (looked at each time an answer is logged);
    /// false when `limit` passed first.
    pub fn wait_until(&self, limit: Duration, pred: impl Fn(&[Request]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.shared.state.lock().unwrap();
        loop {
            if pred(&st.log) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Faults applied so far that `pred` accepts.
    pub fn faults(&self, pred: impl Fn(Fault) -> bool) -> usize {
        self.log()
            .iter()
            .filter_map(|r| r.fault)
            .filter(|f| pred(*f))
            .count()
    }

    /// Ends every rule's faults: from now on each request is forwarded as it is (a rule
    /// whose turn never came does not fire later).
    pub fn heal(&self) {
        for r in &mut self.shared.state.lock().unwrap().rules {
            r.fired = r.rule.limit;
        }
    }

    /// A one-line-per-request dump for assertion messages.
    pub fn dump(&self) -> String {
        self.log()
            .iter()
            .map(|r| {
                format!(
                    "{} {}{} -> {}\n",
                    r.method,
                    r.target,
                    if r.copy { " (copy)" } else { "" },
                    match (r.fault, r.status) {
                        (Some(f), _) => format!("{f:?}"),
                        (None, Some(s)) => s.to_string(),
                        (None, None) => "no response".into(),
                    }
                )
            })
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// A parsed message head.
struct Head {
    /// The head's bytes, CRLFCRLF included.
    raw: Vec<u8>,
    /// Request: method, target. Response: version, status.
    first: (String, String),
    headers: Vec<(String, String)>,
}

impl Head {
    fn parse(raw: Vec<u8>) -> io::Result<Head> {
        let text = std::str::from_utf8(&raw).map_err(|_| bad("head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let mut parts = first.splitn(3, ' ');
        let (a, b) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok(Head {
            raw,
            first: (a, b),
            headers,
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> io::Result<Option<u64>> {
        self.header("content-length")
            .map(|v| v.parse().map_err(|_| bad("bad Content-Length")))
            .transpose()
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_owned())
}

fn find_end_of_head(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Waits for a complete request head and returns it without consuming it (None at EOF).
fn peek_head(s: &TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 64 << 10];
    let mut last = 0;
    loop {
        let n = s.peek(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(end) = find_end_of_head(&buf[..n]) {
            return Ok(Some(buf[..end].to_vec()));
        }
        if n == buf.len() {
            return Err(bad("request head too large"));
        }
        if n == last {
            // Part of a head: peek returns at once until more arrives.
            std::thread::sleep(Duration::from_millis(1));
        }
        last = n;
    }
}

/// Reads one CRLF-terminated line (for chunk sizes and trailers), byte by byte so nothing
/// past it is consumed from an unbuffered stream.
fn read_line(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8];
    while !line.ends_with(b"\r\n") {
        if r.read(&mut b)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        line.push(b[0]);
        if line.len() > 8 << 10 {
            return Err(bad("line too long"));
        }
    }
    Ok(line)
}

/// Copies exactly `n` bytes.
fn copy_exact(r: &mut impl Read, w: &mut impl Write, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), w)?;
    if copied == n {
        Ok(())
    } else {
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

/// Copies a chunked body, chunk framing and trailers included.
fn copy_chunked(r: &mut impl Read, w: &mut impl Write) -> io::Result<()> {
    loop {
        let line = read_line(r)?;
        w.write_all(&line)?;
        let text = std::str::from_utf8(&line).map_err(|_| bad("chunk size"))?;
        let size = text.trim().split(';').next().unwrap_or_default();
        let size = u64::from_str_radix(size, 16).map_err(|_| bad("chunk size"))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let t = read_line(r)?;
                w.write_all(&t)?;
                if t == b"\r\n" {
                    return Ok(());
                }
            }
        }
        copy_exact(r, w, size + 2)?;
    }
}

/// Copies (or with `io::sink()`, discards) a message body framed by `head`.
fn copy_body(head: &Head, r: &mut impl Read, w: &mut impl Write) -> io::Result<()> {
    if head.chunked() {
        copy_chunked(r, w)
    } else {
        copy_exact(r, w, head.content_length()?.unwrap_or(0))
    }
}

/// Reads a response head from a buffered upstream.
fn read_response_head(r: &mut BufReader<TcpStream>) -> io::Result<Head> {
    let mut raw = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut raw)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if raw.ends_with(b"\r\n\r\n") {
            return Head::parse(raw);
        }
        if raw.len() > 64 << 10 {
            return Err(bad("response head too large"));
        }
    }
}

const INTERNAL_ERROR_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message></Error>";
const UNREADABLE_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<SomethingElseEntirely><Note>not the document the operation answers with</Note></SomethingElseEntirely>";
const SLOW_DOWN_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

/// Serves one client connection until either side closes it.
fn serve(mut client: TcpStream, shared: &Shared) -> io::Result<()> {
    // A head and its body go out in separate writes: with Nagle's algorithm the second
    // would wait for the peer's delayed ACK (40 ms a request).
    client.set_nodelay(true)?;
    let mut upstream: Option<(TcpStream, BufReader<TcpStream>)> = None;
    loop {
        let Some(raw) = peek_head(&client)? else {
            return Ok(());
        };
        let head = Head::parse(raw)?;
        let req = Request {
            method: head.first.0.clone(),
            target: head.first.1.clone(),
            copy: head.header("x-amz-copy-source").is_some(),
            fault: None,
            status: None,
            waited: None,
            body_bytes: 0,
        };
        let (index, fault) = shared.admit(req);
        match fault {
            Some(Fault::Reset) => {
                // The head is still unread in the socket: closing now sends a RST.
                drop(client);
                return Ok(());
            }
            Some(Fault::Silent(d)) => {
                std::thread::sleep(d);
                drop(client);
                return Ok(());
            }
            _ => {}
        }
        copy_exact(&mut client, &mut io::sink(), head.raw.len() as u64)?;
        let answer = match fault {
            Some(Fault::SlowDown) => Some(("503 Slow Down", "Retry-After: 1\r\n", SLOW_DOWN_BODY)),
            Some(Fault::InternalErrorIn200) => Some(("200 OK", "", INTERNAL_ERROR_BODY)),
            _ => None,
        };
        if let Some((status, headers, body)) = answer {
            copy_body(&head, &mut client, &mut io::sink())?;
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(response.as_bytes())?;
            let _ = client.shutdown(Shutdown::Write);
            return Ok(());
        }

        if upstream.is_none() {
            let s = TcpStream::connect(shared.upstream)?;
            s.set_nodelay(true)?;
            let r = BufReader::with_capacity(256 << 10, s.try_clone()?);
            upstream = Some((s, r));
        }
        let (up_w, up_r) = upstream.as_mut().expect("connected above");
        up_w.write_all(&head.raw)?;
        {
            let w = io::BufWriter::with_capacity(256 << 10, &mut *up_w);
            let mut w = Counting { inner: w, n: 0 };
            copy_body(&head, &mut client, &mut w)?;
            w.flush()?;
            shared.set_body_bytes(index, w.n);
        }
        let forwarded = Instant::now();
        let is_head = head.first.0 == "HEAD";
        // Interim 1xx responses are relayed as they come.
        let response = loop {
            let r = read_response_head(up_r)?;
            let status: u16 = r.first.1.parse().map_err(|_| bad("status"))?;
            if (100..200).contains(&status) && status != 101 {
                if fault.is_none() {
                    client.write_all(&r.raw)?;
                }
                continue;
            }
            break r;
        };
        shared.set_waited(index, forwarded.elapsed());
        let status: u16 = response.first.1.parse().map_err(|_| bad("status"))?;
        let no_body = is_head || status == 204 || status == 304;
        let framed = response.chunked() || response.content_length()?.is_some();
        if fault == Some(Fault::UnreadableIn200) {
            if !no_body && framed {
                copy_body(&response, up_r, &mut io::sink())?;
            }
            shared.set_status(index, status);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{UNREADABLE_BODY}",
                UNREADABLE_BODY.len()
            );
            client.write_all(response.as_bytes())?;
            let _ = client.shutdown(Shutdown::Write);
            return Ok(());
        }
        if let Some(Fault::Stall(d)) = fault {
            // The server has done the work; the client never hears about it.
            if !no_body && framed {
                copy_body(&response, up_r, &mut io::sink())?;
            }
            std::thread::sleep(d);
            return Ok(());
        }
        client.write_all(&response.raw)?;
        if !no_body {
            if framed {
                copy_body(&response, up_r, &mut client)?;
            } else {
                io::copy(up_r, &mut client)?;
                shared.set_status(index, status);
                return Ok(());
            }
        }
        client.flush()?;
        shared.set_status(index, status);
        if response.closes() || head.closes() {
            let _ = client.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-connection fake server: answers each request from `responses` in turn.
    fn fake_upstream(responses: Vec<&'static str>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for resp in responses {
                let mut raw = Vec::new();
                while !raw.ends_with(b"\r\n\r\n") {
                    if r.read_until(b'\n', &mut raw).unwrap() == 0 {
                        return;
                    }
                }
                let head = Head::parse(raw).unwrap();
                copy_body(&head, &mut r, &mut io::sink()).unwrap();
                w.write_all(resp.as_bytes()).unwrap();
            }
        });
        format!("http://{addr}")
    }

    fn exchange(s: &mut TcpStream, r: &mut BufReader<TcpStream>, req: &str) -> (u16, Vec<u8>) {
        s.write_all(req.as_bytes()).unwrap();
        let head = read_response_head(r).unwrap();
        let status = head.first.1.parse().unwrap();
        let mut body = Vec::new();
        if !req.starts_with("HEAD") {
            copy_body(&head, r, &mut body).unwrap();
        }
        (status, body)
    }

    #[test]
    fn proxy_relays_keep_alive_exchanges_and_injects_faults() {
        let upstream = fake_upstream(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 42\r\nETag: \"x\"\r\n\r\n",
        ]);
        let proxy = Proxy::start(
            &upstream,
            vec![Rule::after(Kind::UploadPart, 0, 1, Fault::SlowDown)],
        );
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let (st, body) = exchange(
            &mut s,
            &mut r,
            "PUT /b/x.narinfo?x-id=PutObject HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert_eq!((st, body.as_slice()), (200, &b"hello"[..]));
        let (st, body) = exchange(
            &mut s,
            &mut r,
            "PUT /b/nar/y.nar.zst HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        );
        assert_eq!(st, 200);
        assert_eq!(body, b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        let (st, _) = exchange(&mut s, &mut r, "HEAD /b/k HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(st, 200);
        // A new connection: the UploadPart gets the 503 without reaching the server.
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let (st, body) = exchange(
            &mut s,
            &mut r,
            "PUT /b/.s/k?partNumber=1&uploadId=u HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabcd",
        );
        assert_eq!(st, 503);
        assert!(String::from_utf8_lossy(&body).contains("<Code>SlowDown</Code>"));
        assert_eq!(proxy.forwarded(Kind::NarinfoPut), 1);
        assert_eq!(proxy.forwarded(Kind::NarPut), 1);
        assert_eq!(proxy.forwarded(Kind::Head), 1);
        assert_eq!(proxy.faults(|f| f == Fault::SlowDown), 1);
        assert_eq!(proxy.log()[3].key(), ".s/k");
    }

    #[test]
    fn a_reset_closes_the_connection_without_forwarding() {
        let upstream = fake_upstream(vec![]);
        let proxy = Proxy::start(&upstream, vec![Rule::every(1, 1, &[Fault::Reset])]);
        let mut s = TcpStream::connect(("127.0.0.1", proxy.port())).unwrap();
        s.write_all(b"PUT /b/k HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap();
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        assert!(
            buf.is_empty(),
            "no response bytes: {:?}",
            String::from_utf8_lossy(&buf)
        );
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert_eq!(proxy.log().len(), 1);
        assert_eq!(proxy.log()[0].fault, Some(Fault::Reset));
    }
}
