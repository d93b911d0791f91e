//! `narflow daemon --watch-store` against real Nix: paths that become valid without a hook
//! are uploaded (`all`: every one, `.drv` files aside; `built`: those Nix built here), the
//! cursor survives restarts, a path both handed off and watched is queued once, and a Nix
//! database that cannot be read stops the start.
//!
//! Other tests add paths to the same store meanwhile, and a watcher queues those too: the
//! assertions here are about this test's own paths only.
use crate::daemon::{Daemon, running_as_root, stderr};
use crate::helpers::*;
use narflow::daemon::queue::Queue;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A file:// cache in `dir`: (URL, directory).
fn file_cache(dir: &Path) -> (String, PathBuf) {
    let cache = dir.join("cache");
    (format!("file://{}", cache.display()), cache)
}

/// Whether `path` went into `cache` once the watcher saw it: waits until the watcher's
/// cursor has passed the path's row (it commits the paths it queued with the cursor, so
/// the path is queued by then) and the queue has it done.
fn published(daemon: &Daemon, cache: &Path, path: &str) -> bool {
    let id = valid_id(path);
    let deadline = Instant::now() + Duration::from_secs(60);
    while cursor(daemon) < id {
        assert!(
            Instant::now() < deadline,
            "the watcher never passed {path} (row {id}): {}\n{}",
            daemon.status(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        queue_state(daemon, path).is_some(),
        "the watcher passed {path} (row {id}) without queueing it: {}",
        daemon.status()
    );
    wait_done(daemon, path);
    cache.join(narinfo_key(path)).exists()
}

/// `path`'s `ValidPaths.id` in the Nix database.
fn valid_id(path: &str) -> i64 {
    rusqlite::Connection::open_with_flags(
        "/nix/var/nix/db/db.sqlite",
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
    .query_row("SELECT id FROM ValidPaths WHERE path = ?1", [path], |r| {
        r.get(0)
    })
    .unwrap()
}

/// The watcher's cursor in the daemon's status.
fn cursor(daemon: &Daemon) -> i64 {
    let s = daemon.status();
    s["watch"]["cursor"]
        .as_i64()
        .unwrap_or_else(|| panic!("no watch cursor in {s}"))
}

/// The state of `path` in the daemon's queue, if it has a row.
fn queue_state(daemon: &Daemon, path: &str) -> Option<&'static str> {
    Queue::open_read_only(&daemon.state)
        .unwrap()
        .state_of(path)
        .unwrap()
}

/// Waits until `path` is done in the daemon's queue.
fn wait_done(daemon: &Daemon, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue_state(daemon, path) != Some("done") {
        assert!(
            Instant::now() < deadline,
            "{path} is not done: {}\n{}",
            daemon.status(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn watch_store_all_uploads_an_added_path_and_no_drv_file() {
    let dir = tempdir();
    let (url, cache) = file_cache(dir.path());
    let daemon = Daemon::start(dir.path(), &url, &["--unsigned", "--watch-store=all"]);
    assert_eq!(daemon.status()["watch"]["mode"], "all");
    let added = BigPath::new("watch-all", 2000);
    assert!(
        published(&daemon, &cache, &added.path),
        "{} not in the cache: {}\n{}",
        added.path,
        daemon.status(),
        daemon.log_text()
    );
    // A build registers its .drv file and its output: the output goes up, the .drv not.
    let u = unique("watch-all-built");
    let out = nix_build(&format!(
        "derivation {{ name = \"watch-all\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {u} > $out\" ]; }}"
    ));
    assert!(published(&daemon, &cache, &out[0]), "{out:?}");
    let drv = stdout(Command::new("nix-store").args(["-q", "--deriver", &out[0]]));
    assert!(drv.ends_with(".drv"), "{drv}");
    wait_done(&daemon, &out[0]);
    assert!(cursor(&daemon) >= valid_id(&drv).max(valid_id(&out[0])));
    assert!(!cache.join(narinfo_key(&drv)).exists());
    assert_eq!(queue_state(&daemon, &drv), None);
    let s = daemon.status();
    assert!(
        s["watch"]["queued_since_start"].as_u64().unwrap() >= 2,
        "{s}"
    );
}

#[test]
fn watch_store_built_uploads_a_build_without_a_hook_but_not_an_added_path() {
    let dir = tempdir();
    let (url, cache) = file_cache(dir.path());
    // Bare `--watch-store` is `built`.
    let daemon = Daemon::start(dir.path(), &url, &["--unsigned", "--watch-store"]);
    assert_eq!(daemon.status()["watch"]["mode"], "built");
    let added = BigPath::new("watch-built-added", 2000);
    let last = nix_build_chain("watch-built", 3);
    let outputs = nix_closure(&last);
    assert_eq!(outputs.len(), 3);
    for p in &outputs {
        assert!(
            published(&daemon, &cache, p),
            "{p} not in the cache: {}\n{}",
            daemon.status(),
            daemon.log_text()
        );
    }
    // The watcher has looked past the added path (registered before the build), and left
    // it alone.
    assert!(valid_id(&added.path) < valid_id(&last));
    assert!(cursor(&daemon) >= valid_id(&last));
    assert_eq!(queue_state(&daemon, &added.path), None);
    assert!(!cache.join(narinfo_key(&added.path)).exists());
}

#[test]
fn the_cursor_survives_a_restart_and_a_path_handed_off_and_watched_is_queued_once() {
    let dir = tempdir();
    let (url, cache) = file_cache(dir.path());
    let before_first_start = BigPath::new("watch-before", 1000);
    let mut daemon = Daemon::start(dir.path(), &url, &["--unsigned", "--watch-store=all"]);
    // The first start begins at the store's end.
    assert!(cursor(&daemon) >= valid_id(&before_first_start.path));
    let at_stop = cursor(&daemon);
    assert!(daemon.terminate().success(), "{}", daemon.log_text());
    // `narflow status` without a daemon shows the cursor from the queue file.
    let status = stdout(
        narflow()
            .arg("status")
            .arg("--socket")
            .arg(&daemon.socket)
            .arg("--state-dir")
            .arg(&daemon.state),
    );
    assert!(
        status.contains(&format!(
            "watch-store: (not running), at Nix database row {at_stop}"
        )),
        "{status}"
    );
    // While the daemon is down: one path is only added, one is also handed off (spooled).
    let watched = BigPath::new("watch-down", 1000);
    let both = BigPath::new("watch-both", 1000);
    daemon.hook(std::slice::from_ref(&both.path));
    daemon.restart();
    for p in [&watched.path, &both.path] {
        assert!(
            published(&daemon, &cache, p),
            "{p} not in the cache: {}\n{}",
            daemon.status(),
            daemon.log_text()
        );
        wait_done(&daemon, p);
    }
    assert!(cursor(&daemon) >= valid_id(&both.path));
    let status = stdout(narflow().arg("status").arg("--socket").arg(&daemon.socket));
    assert!(
        status.contains("watch-store: all, at Nix database row "),
        "{status}"
    );
    // Not a second first start: what was there before it is not queued.
    assert_eq!(queue_state(&daemon, &before_first_start.path), None);
    assert!(!cache.join(narinfo_key(&before_first_start.path)).exists());
    assert_eq!(daemon.log_text().matches("first start").count(), 1);
    // The spooled hand-off queued it; the watcher, seeing it, kept that one row as it was
    // (queued once: its generation is 1), and it was uploaded once.
    let q = rusqlite::Connection::open_with_flags(
        daemon.state.join("queue.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let (rows, generation): (i64, i64) = q
        .query_row(
            "SELECT COUNT(*), MAX(generation) FROM paths WHERE path = ?1",
            [&both.path],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, generation), (1, 1));
}

#[test]
fn watch_store_refuses_to_start_when_the_nix_database_cannot_be_read() {
    if !running_as_root() {
        println!("unreadable database test skipped: needs root (mount namespace)");
        return;
    }
    let dir = tempdir();
    let (url, _) = file_cache(dir.path());
    let socket = dir.path().join("daemon.sock");
    // The database hidden behind an empty directory, as for a user who cannot read it.
    let script = format!(
        "mount -t tmpfs none /nix/var/nix/db && exec timeout 60 {narflow} daemon --to {url} \
         --unsigned --watch-store=all --socket {socket} --state-dir {state}",
        narflow = env!("CARGO_BIN_EXE_narflow"),
        socket = socket.display(),
        state = dir.path().join("state").display(),
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("--watch-store: "), "{e}");
    assert!(e.contains("read access to the Nix database"), "{e}");
    assert!(!socket.exists(), "the refused daemon left its socket");
}
