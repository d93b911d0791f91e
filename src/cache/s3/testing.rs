//! A stand-in S3 endpoint and caches pointed at it, for the unit tests.
use super::S3Cache;
use crate::cache::url::CacheUrl;
use crate::cache::{OpenOptions, S3Tuning};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What the stand-in endpoint saw.
#[derive(Debug, Default)]
pub(super) struct Seen {
    state: Mutex<Traffic>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct Traffic {
    /// Requests read so far.
    requests: usize,
    /// Requests read and not answered yet, and the most there were at once.
    waiting: usize,
    most_waiting: usize,
    /// Request lines answered with a fault once already.
    failed: std::collections::HashSet<String>,
    /// Each request's line and Content-Type, in the order they were read.
    log: Vec<(String, Option<String>)>,
    /// Each request's body length, in the same order.
    lengths: Vec<u64>,
}

impl Seen {
    /// The most requests that were waiting for their answers at once.
    pub(super) fn most_in_flight(&self) -> usize {
        self.state.lock().unwrap().most_waiting
    }

    /// Each request so far: its request line and its Content-Type.
    pub(super) fn requests(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().log.clone()
    }

    /// The body length of each request whose line contains `part`, in order.
    pub(super) fn lengths_of(&self, part: &str) -> Vec<u64> {
        let st = self.state.lock().unwrap();
        st.log
            .iter()
            .zip(&st.lengths)
            .filter(|((line, _), _)| line.contains(part))
            .map(|(_, len)| *len)
            .collect()
    }
}

/// A stand-in S3 endpoint on loopback that accepts every request: it starts
/// multipart uploads, takes parts (reading their bodies), and answers 200/204.
pub(super) fn accepting_server() -> String {
    stand_in(1).0
}

/// [`accepting_server`], answering in groups: a request is answered once `hold` requests
/// (its own included) have arrived since the group began, or after 2 s, so that a test
/// sees how many requests the client sends at once. A request whose target contains
/// `fail-once` is answered `503 SlowDown` the first time. A DeleteObjects answer refuses
/// `nar/refused` (AccessDenied) and `nar/busy` (SlowDown); in bucket `garbled` it is a
/// document that is not S3's.
pub(super) fn stand_in(hold: usize) -> (String, Arc<Seen>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let seen = shared.clone();
            std::thread::spawn(move || serve(conn, &seen, hold.max(1)));
        }
    });
    (format!("http://{addr}"), seen)
}

fn serve(conn: std::net::TcpStream, seen: &Seen, hold: usize) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let len: u64 = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        io::copy(&mut (&mut r).take(len), &mut io::sink()).unwrap();
        let first = head.lines().next().unwrap_or_default().to_owned();
        let fail = {
            let mut st = seen.state.lock().unwrap();
            let me = st.requests;
            st.requests += 1;
            st.log.push((first.clone(), header("content-type")));
            st.lengths.push(len);
            st.waiting += 1;
            st.most_waiting = st.most_waiting.max(st.waiting);
            seen.arrived.notify_all();
            let group_end = (me / hold + 1) * hold;
            let (mut st, _) = seen
                .arrived
                .wait_timeout_while(st, Duration::from_secs(2), |st| st.requests < group_end)
                .unwrap();
            // No longer waiting once the answer goes out: the client may send the next
            // request as soon as it has it.
            st.waiting -= 1;
            first.contains("fail-once") && st.failed.insert(first.clone())
        };
        let (method, target) = first.split_once(' ').unwrap_or_default();
        let (status, body) = if fail {
            (
                "503 Slow Down",
                "<Error><Code>SlowDown</Code><Message>slow down</Message></Error>",
            )
        } else if method == "POST" && target.contains("?delete") && target.contains("garbled") {
            ("200 OK", "<NotWhatS3Sends/>")
        } else if method == "POST" && target.contains("?delete") {
            (
                "200 OK",
                "<DeleteResult>\
                 <Error><Key>nar/refused</Key><Code>AccessDenied</Code><Message>no</Message></Error>\
                 <Error><Key>nar/busy</Key><Code>SlowDown</Code><Message>later</Message></Error>\
                 </DeleteResult>",
            )
        } else if method == "POST" && target.contains("?uploads") {
            (
                "200 OK",
                "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
                 <UploadId>u</UploadId></InitiateMultipartUploadResult>",
            )
        } else if method == "POST" {
            (
                "200 OK",
                "<CompleteMultipartUploadResult><ETag>\"e\"</ETag></CompleteMultipartUploadResult>",
            )
        } else if method == "GET" && target.contains("list-type=2") {
            listing_page(target.contains("continuation-token"))
        } else if method == "GET" && target.contains("?uploads") {
            (
                "200 OK",
                "<ListMultipartUploadsResult><Bucket>b</Bucket>\
                 <IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
            )
        } else if method == "PUT" && header("x-amz-copy-source").is_some() {
            (
                "200 OK",
                "<CopyObjectResult><ETag>\"e\"</ETag></CopyObjectResult>",
            )
        } else if method == "DELETE" {
            ("204 No Content", "")
        } else {
            ("200 OK", "")
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nETag: \"e\"\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// The hash parts of the narinfos the stand-in lists, on the first and second page of
/// every listing (with `nix-cache-info` and the `nar/` prefix on the first), listed with
/// the ETags `"e"` (escaped, as S3 sends it) and `"f"`; every other answer has ETag `"e"`.
pub(super) const LISTED: [&str; 2] = [
    "11111111111111111111111111111111",
    "22222222222222222222222222222222",
];

/// A ListObjectsV2 page of the stand-in: the first (truncated, continued by `t`) or the
/// second and last.
fn listing_page(second: bool) -> (&'static str, &'static str) {
    if second {
        return (
            "200 OK",
            "<ListBucketResult><Name>b</Name><IsTruncated>false</IsTruncated>\
             <Contents><Key>22222222222222222222222222222222.narinfo</Key><Size>1</Size>\
             <ETag>\"f\"</ETag></Contents>\
             </ListBucketResult>",
        );
    }
    (
        "200 OK",
        "<ListBucketResult><Name>b</Name><IsTruncated>true</IsTruncated>\
         <NextContinuationToken>t</NextContinuationToken>\
         <Contents><Key>11111111111111111111111111111111.narinfo</Key><Size>1</Size>\
         <ETag>&quot;e&quot;</ETag></Contents>\
         <Contents><Key>nix-cache-info</Key><Size>1</Size></Contents>\
         <CommonPrefixes><Prefix>nar/</Prefix></CommonPrefixes>\
         </ListBucketResult>",
    )
}

pub(super) fn cache_at(endpoint: &str, memory: u64) -> S3Cache {
    cache_with(endpoint, memory, |_| {})
}

/// A cache at `endpoint` with `memory` of upload memory, no retries unless `tune` says
/// otherwise, and fixed credentials.
pub(super) fn cache_with(endpoint: &str, memory: u64, tune: impl FnOnce(&mut S3Tuning)) -> S3Cache {
    bucket_with(endpoint, "b", memory, tune)
}

/// [`cache_with`] for another bucket (the stand-in answers some buckets' requests its
/// own way).
pub(super) fn bucket_with(
    endpoint: &str,
    bucket: &str,
    memory: u64,
    tune: impl FnOnce(&mut S3Tuning),
) -> S3Cache {
    let url = CacheUrl::parse(&format!(
        "s3://{bucket}?endpoint={endpoint}&region=us-east-1&retries=0"
    ))
    .unwrap();
    let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "tests");
    let mut s3 = S3Tuning::from_url(&url).unwrap();
    tune(&mut s3);
    let opts = OpenOptions {
        upload_memory: memory,
        max_rate: None,
        s3,
        journal: None,
        signers: Vec::new(),
    };
    S3Cache::build(bucket, &url, &opts, Some(creds)).unwrap()
}

/// A cache at `endpoint` (bucket `b`, URL options `extra` added) that records the
/// narinfos it writes in `journal`, signed by `signers`.
pub(super) fn recording_cache(
    endpoint: &str,
    extra: &str,
    journal: Arc<dyn crate::cache::resume::UploadJournal>,
    signers: Vec<crate::format::signing::VerifyingKey>,
) -> S3Cache {
    let url = CacheUrl::parse(&format!(
        "s3://b?endpoint={endpoint}&region=us-east-1&retries=0{extra}"
    ))
    .unwrap();
    let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "tests");
    let opts = OpenOptions {
        upload_memory: 64 << 20,
        max_rate: None,
        s3: S3Tuning::from_url(&url).unwrap(),
        journal: Some(journal),
        signers,
    };
    S3Cache::build("b", &url, &opts, Some(creds)).unwrap()
}

/// Runs `f` on a thread of its own and returns what it returns; fails the test, naming
/// `what`, when `f` has not returned within `limit` (a wait that never ends), or panicked.
pub(super) fn within_deadline<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("stuck: {what}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("panicked: {what}"),
    }
}
