//! Resumable multipart uploads, end to end on the S3 test server: a daemon killed with -9
//! part-way through a large NAR, restarted; bytes counted at the proxy in `proxy.rs`
//! between narflow and the server. After the restart only what the server lacks goes up
//! again, the object is byte-identical to what a fresh upload sends, real Nix substitutes
//! it, and nothing of the upload is left behind; a restart with other compression settings
//! reuses nothing; a path garbage-collected meanwhile has its recorded upload aborted.
use crate::daemon::{Daemon, stderr};
use crate::helpers::*;
use crate::proxy::{Kind, Proxy, Request};
use narflow::format::hash::Sha256;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// How long a run may take to reach the point a test waits for (far more than it needs).
const LIMIT: Duration = Duration::from_secs(300);

/// Compressed bytes the server acknowledged in parts (UploadPart answered 2xx).
fn acked_part_bytes(log: &[Request]) -> u64 {
    log.iter()
        .filter(|r| r.is(Kind::UploadPart) && matches!(r.status, Some(200..=299)))
        .map(|r| r.body_bytes)
        .sum()
}

/// A daemon uploading `path` (signed with `key`) through `proxy`, with `args`, killed
/// with -9 once the server acknowledged parts worth `fraction` of its NAR size. Returns
/// it stopped.
fn killed_part_way(
    dir: &std::path::Path,
    s3: &S3Env,
    proxy: &Proxy,
    key: &NixKey,
    path: &str,
    fraction: f64,
    args: &[&str],
) -> Daemon {
    let url = s3.url_at(&proxy.endpoint(), "");
    let mut all = vec!["--key-file", key.secret.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut daemon = Daemon::start(dir, &url, &all);
    assert!(
        stderr(&daemon.hook(&[path.to_owned()])).is_empty(),
        "{}",
        daemon.log_text()
    );
    let target = (nar_size(path) as f64 * fraction) as u64;
    assert!(
        proxy.wait_until(LIMIT, |log| acked_part_bytes(log) >= target),
        "parts worth {target} bytes were never acknowledged:\n{}\n{}",
        daemon.log_text(),
        proxy.dump()
    );
    daemon.kill9();
    daemon
}

/// The NAR size of a store path, from the store.
fn nar_size(path: &str) -> u64 {
    let info = nix_path_info(None, &[path.to_owned()]);
    info[0]["narSize"].as_u64().expect("narSize")
}

/// SHA-256 of the object at `url` (streamed through curl, never held in memory).
fn sha256_over_http(url: &str) -> Sha256 {
    let mut curl = Command::new("curl")
        .args(["-sSf", url])
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let out = Command::new("sha256sum")
        .stdin(curl.stdout.take().unwrap())
        .output()
        .expect("sha256sum");
    assert!(curl.wait().unwrap().success(), "GET {url} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.split_whitespace().next().expect("a digest");
    Sha256::parse(&format!("sha256:{hex}")).expect("a SHA-256")
}

/// Checks the cache's copy of `path`: its narinfo names a NAR whose bytes hash to its
/// FileHash (the stream the pipeline computed, which a fresh upload sends as it is) at
/// its FileSize; real Nix substitutes it. Returns the NAR's key and FileSize.
fn assert_uploaded_whole(s3: &S3Env, key: &NixKey, path: &str) -> (String, u64) {
    let client = s3.client();
    let narinfo = client
        .get_text(&narinfo_key(path))
        .unwrap_or_else(|| panic!("no narinfo for {path}"));
    let nar_url = narinfo_field(&narinfo, "URL").unwrap().to_owned();
    let file_hash = Sha256::parse(narinfo_field(&narinfo, "FileHash").unwrap()).unwrap();
    let file_size: u64 = narinfo_field(&narinfo, "FileSize")
        .unwrap()
        .parse()
        .unwrap();
    let head = client
        .head(&nar_url)
        .unwrap_or_else(|| panic!("{nar_url} is not in the bucket"));
    assert_eq!(head.size, file_size, "{nar_url}");
    assert_eq!(
        sha256_over_http(&format!("{}/{nar_url}", s3.http_url)),
        file_hash,
        "{nar_url} is not the stream a fresh upload sends"
    );
    assert_nix_substitutes(&s3.http_url, key, &[path.to_owned()]);
    (nar_url, file_size)
}

/// Asserts that no multipart upload narflow created through `proxy` is left on the server,
/// and that no object is left under their keys but the NARs in `finals`.
fn assert_nothing_left(s3: &S3Env, proxy: &Proxy, finals: &[&str]) {
    let client = s3.client();
    let created: Vec<String> = proxy
        .log()
        .iter()
        .filter(|r| r.is(Kind::CreateMultipart))
        .map(|r| r.key().to_owned())
        .collect();
    assert!(
        !created.is_empty(),
        "no multipart upload went through the proxy"
    );
    for key in &created {
        let left = client.multipart_uploads(key);
        assert!(
            left.iter().all(|(k, _)| k != key),
            "multipart uploads of {key} left: {left:?}"
        );
        if !finals.contains(&key.as_str()) {
            assert!(!client.exists(key), "staging object {key} left");
        }
    }
}

/// What a test put in the shared bucket, removed when dropped (also when the test failed,
/// so the server's disk is spared): the multipart uploads narflow created through the
/// proxy and their staging objects, and the path's narinfo and NAR.
struct Leftovers<'a> {
    s3: &'a S3Env,
    proxy: &'a Proxy,
    path: String,
}

impl Drop for Leftovers<'_> {
    fn drop(&mut self) {
        let c = self.s3.client();
        for r in self
            .proxy
            .log()
            .iter()
            .filter(|r| r.is(Kind::CreateMultipart))
        {
            let key = r.key();
            for (k, id) in c.multipart_uploads(key) {
                if k == key {
                    c.abort_multipart(&k, &id);
                }
            }
            c.delete(key);
        }
        let narinfo = narinfo_key(&self.path);
        if let Some(text) = c.get_text(&narinfo) {
            if let Some(nar) = narinfo_field(&text, "URL") {
                c.delete(nar);
            }
            c.delete(&narinfo);
        }
    }
}

/// A daemon killed with -9 once 80% of a 2 GiB incompressible NAR's parts are
/// acknowledged: after a restart the upload completes, sending at most a quarter of the
/// NAR again; `narflow status` shows the upload with what was resumed; the object is
/// byte-identical to a fresh upload, Nix substitutes it, and no multipart upload or
/// staging object is left.
#[test]
fn a_daemon_killed_at_80_percent_of_a_2_gib_nar_sends_at_most_a_quarter_again() {
    let Some(s3) = s3_env() else { return };
    let dir = tempdir();
    let key = nix_generate_key("resume-2g");
    let big = BigPath::new("resume-2g", 2 << 30);
    let nar = nar_size(&big.path);
    let proxy = Proxy::start(&s3.endpoint, Vec::new());
    let _leftovers = Leftovers {
        s3: &s3,
        proxy: &proxy,
        path: big.path.clone(),
    };
    // About 25 s for the whole NAR at the cap.
    let mut daemon = killed_part_way(
        dir.path(),
        &s3,
        &proxy,
        &key,
        &big.path,
        0.8,
        &["--max-rate", "80M"],
    );
    let mark = proxy.log().len();
    daemon.restart();

    // While it runs, the status shows the upload and what the restart did not send again.
    let deadline = Instant::now() + LIMIT;
    let seen = loop {
        let s = daemon.status();
        let resumed = s["large_uploads"]
            .as_array()
            .unwrap_or_else(|| panic!("no large_uploads in {s}"))
            .iter()
            .find(|u| u["store_path"] == big.path.as_str())
            .filter(|u| u["bytes_resumed"].as_u64().unwrap() >= nar / 2)
            .cloned();
        if let Some(u) = resumed {
            break Some(u);
        }
        if s["pending"] == 0 && s["in_flight"] == 0 {
            break None;
        }
        assert!(Instant::now() < deadline, "{s}\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    let u = seen.unwrap_or_else(|| {
        panic!(
            "the status never showed the resumed upload:\n{}",
            daemon.log_text()
        )
    });
    assert!(
        u["parts_done"].as_u64().unwrap() <= u["parts_total"].as_u64().unwrap()
            && u["bytes_total"].as_u64().unwrap() >= nar,
        "{u}"
    );
    let status = daemon.wait_idle();
    assert_eq!(status["done"], 1, "{status}\n{}", daemon.log_text());

    let log = proxy.log();
    let sent = Proxy::body_bytes(&log[mark..], Kind::Any);
    assert!(
        sent <= nar / 4,
        "{sent} bytes sent after the restart, more than a quarter of the {nar}-byte NAR"
    );
    let (nar_url, _) = assert_uploaded_whole(&s3, &key, &big.path);
    assert_nothing_left(&s3, &proxy, &[&nar_url]);
}

/// Other compression settings after the restart (another zstd level): nothing of the
/// recorded upload is reused, every part goes up again, and the result is correct and
/// complete with nothing left behind.
#[test]
fn a_restart_with_another_zstd_level_reuses_nothing() {
    let Some(s3) = s3_env() else { return };
    let dir = tempdir();
    let key = nix_generate_key("resume-level");
    let big = BigPath::new("resume-level", 256 * MIB);
    let proxy = Proxy::start(&s3.endpoint, Vec::new());
    let _leftovers = Leftovers {
        s3: &s3,
        proxy: &proxy,
        path: big.path.clone(),
    };
    let mut daemon = killed_part_way(
        dir.path(),
        &s3,
        &proxy,
        &key,
        &big.path,
        0.5,
        &["--max-rate", "32M", "--level", "3"],
    );
    let mark = proxy.log().len();
    let level = daemon.args.iter().position(|a| a == "--level").unwrap();
    daemon.args[level + 1] = "5".to_owned();
    daemon.restart();
    let status = daemon.wait_idle();
    assert_eq!(status["done"], 1, "{status}\n{}", daemon.log_text());

    let (nar_url, file_size) = assert_uploaded_whole(&s3, &key, &big.path);
    let narinfo = s3.client().get_text(&narinfo_key(&big.path)).unwrap();
    assert_eq!(narinfo_field(&narinfo, "Compression"), Some("zstd"));
    let log = proxy.log();
    let parts = Proxy::body_bytes(&log[mark..], Kind::UploadPart);
    assert!(
        parts >= file_size,
        "only {parts} bytes of parts sent after the restart, for a {file_size}-byte NAR: \
         parts of the other level's upload were reused"
    );
    assert_nothing_left(&s3, &proxy, &[&nar_url]);
}

/// A path garbage-collected between the kill and the restart: the daemon drops it, and
/// its recorded upload is aborted (no multipart upload or staging object is left).
#[test]
fn a_path_collected_before_the_restart_is_dropped_and_its_recorded_upload_aborted() {
    let Some(s3) = s3_env() else { return };
    let dir = tempdir();
    let key = nix_generate_key("resume-gc");
    let big = BigPath::new("resume-gc", 256 * MIB);
    let proxy = Proxy::start(&s3.endpoint, Vec::new());
    let _leftovers = Leftovers {
        s3: &s3,
        proxy: &proxy,
        path: big.path.clone(),
    };
    let mut daemon = killed_part_way(
        dir.path(),
        &s3,
        &proxy,
        &key,
        &big.path,
        0.5,
        &["--max-rate", "32M"],
    );
    // The kill left the upload unfinished on the server.
    let created: Vec<String> = proxy
        .log()
        .iter()
        .filter(|r| r.is(Kind::CreateMultipart))
        .map(|r| r.key().to_owned())
        .collect();
    let client = s3.client();
    assert!(
        created
            .iter()
            .any(|k| client.multipart_uploads(k).iter().any(|(key, _)| key == k)),
        "no unfinished upload after the kill: {created:?}"
    );
    run(Command::new("nix-store").arg("--delete").arg(&big.path));
    daemon.restart();
    let status = daemon.wait_idle();
    assert_eq!(status["dropped"], 1, "{status}\n{}", daemon.log_text());
    assert_eq!(status["dropped_paths"][0]["path"], big.path.as_str());
    assert!(!client.exists(&narinfo_key(&big.path)));
    assert_nothing_left(&s3, &proxy, &[]);
}

/// `narflow push` keeps its records in its upload journal: a push killed with -9 half-way
/// through a NAR's parts and run again sends only what the server lacks.
#[test]
fn a_push_killed_half_way_and_run_again_sends_only_what_the_server_lacks() {
    let Some(s3) = s3_env() else { return };
    let dir = tempdir();
    let key = nix_generate_key("resume-push");
    let big = BigPath::new("resume-push", 256 * MIB);
    let nar = nar_size(&big.path);
    let proxy = Proxy::start(&s3.endpoint, Vec::new());
    let _leftovers = Leftovers {
        s3: &s3,
        proxy: &proxy,
        path: big.path.clone(),
    };
    let url = s3.url_at(&proxy.endpoint(), "");
    let journal = dir.path().join("uploads.sqlite");
    let push = || {
        let mut cmd = narflow();
        cmd.args([
            "push",
            "--max-rate",
            "32M",
            "--to",
            &url,
            "--upload-journal",
        ])
        .arg(&journal)
        .arg("--key-file")
        .arg(&key.secret)
        .arg(&big.path);
        cmd
    };
    let mut child = push()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        proxy.wait_until(LIMIT, |log| acked_part_bytes(log) >= nar / 2),
        "half the parts were never acknowledged:\n{}",
        proxy.dump()
    );
    child.kill().unwrap(); // SIGKILL: nothing can abort the upload
    child.wait().unwrap();
    let mark = proxy.log().len();
    let out = run(push().arg("--json"));
    let second = &proxy.log()[mark..];
    let sent = Proxy::body_bytes(second, Kind::Any);
    assert!(
        sent <= nar * 6 / 10,
        "{sent} bytes sent by the second push, for a {nar}-byte NAR half of which the server had"
    );
    // The summary counts what was not sent again: with the parts this run sent, the
    // whole compressed NAR.
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let resumed = summary["resumed_bytes"].as_u64().unwrap();
    let file = summary["file_bytes"].as_u64().unwrap();
    assert!(resumed >= nar / 4, "{summary}");
    assert_eq!(resumed + acked_part_bytes(second), file, "{summary}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{} resumed",
            narflow::settings::format_size(resumed)
        )),
        "{stderr}"
    );
    let (nar_url, _) = assert_uploaded_whole(&s3, &key, &big.path);
    assert_nothing_left(&s3, &proxy, &[&nar_url]);
}
