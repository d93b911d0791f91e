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

/// The large path's size: 1,024 s of writes at the daemon's `--max-rate`.
const LARGE: u64 = 256 << 20;

/// At most the large path's bytes written while a tiny one goes through: 16 of its 64 KiB
/// chunks. Queued behind the chunks ahead of it (the budget holds hundreds), a tiny path
/// would wait for many more.
const WAITED_BEHIND: u64 = 16 * (64 << 10);

/// NAR bytes the daemon has written into the cache since it started.
fn nar_bytes(socket: &Path) -> u64 {
    let s = status(socket).expect("daemon status");
    s["since_start"]["nar_bytes"].as_u64().unwrap()
}

#[test]
fn tiny_paths_handed_off_during_a_large_upload_are_published_before_it() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    let (socket, state) = (dir.path().join("daemon.sock"), dir.path().join("state"));
    let log = dir.path().join("daemon.log");
    // The large path cannot be published before this test ends, whatever the machine's
    // speed: its 256 MiB (incompressible) go into the cache at 256 KiB/s, at least 1,024 s,
    // longer than every deadline below together. In 64 KiB chunks, so that a small path
    // waits behind at most one chunk's write (a quarter of a second).
    let big = BigPath::new("hol-large", LARGE);
    let logf = std::fs::File::create(&log).unwrap();
    let daemon = Running(
        narflow()
            .args(["daemon", "--to", &url, "--unsigned", "--max-rate", "256K"])
            .args(["--chunk-size", "64K", "--socket"])
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
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&socket).expect("daemon status");
        if s["since_start"]["nar_bytes"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no upload under way: {s}");
        std::thread::sleep(Duration::from_millis(5));
    }

    let files = tempdir();
    let (mut took, mut most_behind) = (Vec::new(), 0);
    for i in 0..20 {
        let file = files.path().join(unique(&format!("hol-tiny-{i}")));
        std::fs::write(&file, format!("tiny {i}\n")).unwrap();
        let path = nix_store_add(&file);
        let narinfo = cache.join(narinfo_key(&path));
        let written = nar_bytes(&socket);
        let handed = Instant::now();
        hand_off(&socket, &state, &path);
        let deadline = handed + Duration::from_secs(30);
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
        // Not queued behind the large one's chunks: only a few of them were written while
        // the tiny one went through (the one being written, and one in every EXPRESS_RUN).
        let behind = nar_bytes(&socket) - written;
        assert!(
            behind <= WAITED_BEHIND,
            "tiny path {i} waited while {behind} bytes of the large one went into the cache"
        );
        most_behind = most_behind.max(behind);
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
        "hand-off to narinfo of 20 tiny paths while {} MiB upload: median {:?}, max {:?}; \
         at most {most_behind} bytes of it written meanwhile",
        LARGE >> 20,
        took[took.len() / 2],
        took[took.len() - 1]
    );
    drop(daemon);
}
