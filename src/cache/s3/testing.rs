//! A stand-in S3 endpoint and caches pointed at it, for the unit tests.
use super::S3Cache;
use crate::cache::url::CacheUrl;
use crate::cache::{OpenOptions, S3Tuning};
use std::io::{self, Write};

/// A stand-in S3 endpoint on loopback that accepts every request: it starts
/// multipart uploads, takes parts (reading their bodies), and answers 200/204.
pub(super) fn accepting_server() -> String {
    use std::io::{BufRead, BufReader, Read};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
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
                    let len: u64 = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    io::copy(&mut (&mut r).take(len), &mut io::sink()).unwrap();
                    let first = head.lines().next().unwrap_or_default().to_owned();
                    let body = if first.starts_with("POST") && first.contains("uploads") {
                        "<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>\
                         <UploadId>u</UploadId></InitiateMultipartUploadResult>"
                    } else {
                        ""
                    };
                    let status = if first.starts_with("DELETE") {
                        "204 No Content"
                    } else {
                        "200 OK"
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nETag: \"e\"\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

pub(super) fn cache_at(endpoint: &str, memory: u64) -> S3Cache {
    let url = CacheUrl::parse(&format!(
        "s3://b?endpoint={endpoint}&region=us-east-1&retries=0"
    ))
    .unwrap();
    let creds = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "tests");
    let opts = OpenOptions {
        upload_memory: memory,
        s3: S3Tuning::from_url(&url).unwrap(),
    };
    S3Cache::build("b", &url, &opts, Some(creds)).unwrap()
}
