//! No head-of-line blocking: small paths handed to a daemon while it uploads a large one
//! are published before the large one, each on its own.
use crate::helpers::*;
use narflow::handoff::protocol::exchange;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The daemon process; killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status(socket: &Path) -> Option<serde_json::Value> {
    let reply = exchange(socket, "STATUS\n", Duration::from_secs(10)).ok()?;
    serde_json::from_str(reply.strip_prefix("OK ")?.trim_end()).ok()
}

fn hand_off(socket: &Path, state: &Path, path: &str) {
    let out = narflow()
        .arg("hook")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state)
        .env("OUT_PATHS", path)
        .env(
            "DRV_PATH",
            "/nix/store/00000000000000000000000000000000-x.drv",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "the hook failed: {out:?}");
    assert!(out.stderr.is_empty(), "not handed off at once: {out:?}");
}

#[test]
fn tiny_paths_handed_off_during_a_large_upload_are_published_before_it() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    let (socket, state) = (dir.path().join("daemon.sock"), dir.path().join("state"));
    let log = dir.path().join("daemon.log");
    let big = BigPath::new("hol-large", 512 << 20);
    let logf = std::fs::File::create(&log).unwrap();
    let daemon = Running(
        narflow()
            // zstd -19 on incompressible data: a large upload that lasts a minute or more
            // even on a fast machine, in 1 MiB chunks so that a compressing thread is
            // free for a small path within a chunk's time.
            .args(["daemon", "--to", &url, "--unsigned", "--level", "19"])
            .args(["--chunk-size", "1M", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&socket).is_none() {
        assert!(Instant::now() < deadline, "no daemon:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(10));
    }

    hand_off(&socket, &state, &big.path);
    let big_narinfo = cache.join(narinfo_key(&big.path));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(&socket).expect("daemon status");
        if s["since_start"]["nar_bytes"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no upload under way: {s}");
        std::thread::sleep(Duration::from_millis(5));
    }

    let files = tempdir();
    let mut took = Vec::new();
    for i in 0..20 {
        let file = files.path().join(unique(&format!("hol-tiny-{i}")));
        std::fs::write(&file, format!("tiny {i}\n")).unwrap();
        let path = nix_store_add(&file);
        let narinfo = cache.join(narinfo_key(&path));
        let handed = Instant::now();
        hand_off(&socket, &state, &path);
        let deadline = handed + Duration::from_secs(600);
        while !narinfo.exists() {
            assert!(
                !big_narinfo.exists(),
                "the large path was published before tiny path {i} ({path}), handed off \
                 {:?} ago:\n{}",
                handed.elapsed(),
                log_text()
            );
            assert!(
                Instant::now() < deadline,
                "{path} not published:\n{}",
                log_text()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        took.push(handed.elapsed());
    }
    assert!(
        !big_narinfo.exists(),
        "the large path was published with the last tiny one"
    );
    // Each is marked done in the queue on its own, while the large one is still in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&socket).expect("daemon status");
        assert!(!big_narinfo.exists(), "{s}");
        if s["done"] == 20 && s["in_flight"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(5));
    }
    took.sort();
    println!(
        "hand-off to narinfo of 20 tiny paths while {} MiB upload: median {:?}, max {:?}",
        512,
        took[took.len() / 2],
        took[took.len() - 1]
    );
    drop(daemon);
}
