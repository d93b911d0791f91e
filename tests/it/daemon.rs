//! `narflow daemon` and `narflow hook` against real Nix: post-build-hook builds, kill -9
//! at random moments, a daemon that is down or stopped, bad input, garbage-collected
//! paths, SIGTERM mid-upload, unsafe state directories, a socket path taken over, one bad
//! path in a batch.
use crate::helpers::*;
use narflow::format::hash::Sha256;
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::VerifyingKey;
use narflow::handoff::protocol::exchange;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A `narflow daemon` process with its own socket and state directory.
pub(crate) struct Daemon {
    child: Option<Child>,
    pub(crate) socket: PathBuf,
    pub(crate) state: PathBuf,
    log: PathBuf,
    pub(crate) args: Vec<String>,
}

impl Daemon {
    /// Starts a daemon uploading to `url` with `args` (e.g. `--key-file K`), in `dir`.
    pub(crate) fn start(dir: &Path, url: &str, args: &[&str]) -> Daemon {
        let mut all = vec!["daemon".to_owned(), "--to".to_owned(), url.to_owned()];
        all.extend(args.iter().map(|s| s.to_string()));
        let mut d = Daemon {
            child: None,
            socket: dir.join("daemon.sock"),
            state: dir.join("state"),
            log: dir.join("daemon.log"),
            args: all,
        };
        d.restart();
        d
    }

    /// Starts a daemon that signs with `key`.
    fn signed(dir: &Path, url: &str, key: &NixKey) -> Daemon {
        Daemon::start(dir, url, &["--key-file", key.secret.to_str().unwrap()])
    }

    /// (Re)starts the process and waits until it answers on its socket.
    pub(crate) fn restart(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = narflow()
            .args(&self.args)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("narflow daemon");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_status().is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the daemon exited ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the daemon does not answer:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM; returns how the process exited.
    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        run(Command::new("kill").arg("-TERM").arg(c.id().to_string()));
        c.wait().unwrap()
    }

    fn pid(&self) -> String {
        self.child.as_ref().expect("running").id().to_string()
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the process.
    fn signal(&self, signal: &str) {
        run(Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid()));
    }

    fn try_status(&self) -> Result<serde_json::Value, String> {
        let reply = exchange(&self.socket, "STATUS\n", Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let json = reply
            .strip_prefix("OK ")
            .ok_or_else(|| format!("reply {reply:?}"))?;
        serde_json::from_str(json.trim_end()).map_err(|e| e.to_string())
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        self.try_status().expect("daemon status")
    }

    /// Waits until nothing is pending or in flight; returns the status then.
    pub(crate) fn wait_idle(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let s = self.status();
            if s["pending"] == 0 && s["in_flight"] == 0 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon is not done: {s}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `narflow hook` for `paths` against this daemon.
    pub(crate) fn hook(&self, paths: &[String]) -> Output {
        hook_at(&self.socket, &self.state, paths)
    }

    /// Sends raw bytes on the socket, returns the reply.
    fn raw(&self, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The daemon may answer and close before it reads everything we send.
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        reply
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether the tests run as root (mounting, switching users).
pub(crate) fn running_as_root() -> bool {
    stdout(Command::new("id").arg("-u")) == "0"
}

/// `narflow hook` with `$OUT_PATHS` = `paths`, as Nix would run it; asserts exit 0.
fn hook_at(socket: &Path, state: &Path, paths: &[String]) -> Output {
    let out = narflow()
        .arg("hook")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state)
        .env("OUT_PATHS", paths.join(" "))
        .env(
            "DRV_PATH",
            "/nix/store/00000000000000000000000000000000-x.drv",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "the hook failed: {out:?}");
    out
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Reads objects of a cache under test.
enum CacheView {
    File(PathBuf),
    S3(S3Client),
}

impl CacheView {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self {
            CacheView::File(dir) => std::fs::read(dir.join(key)).ok(),
            CacheView::S3(c) => c.get(key),
        }
    }

    /// Asserts the cache holds every path of `closure` in a state Nix can use: a narinfo
    /// signed by `key`, a NAR with exactly FileSize bytes and the FileHash, and a narinfo
    /// for each reference.
    fn assert_complete(&self, closure: &BTreeSet<String>, key: &NixKey) {
        let vk = VerifyingKey::parse(&key.public).unwrap();
        for path in closure {
            let text = self
                .get(&narinfo_key(path))
                .unwrap_or_else(|| panic!("no narinfo for {path}"));
            let info = NarInfo::parse(std::str::from_utf8(&text).unwrap(), "/nix/store").unwrap();
            assert_eq!(
                info.valid_signatures("/nix/store", std::slice::from_ref(&vk)),
                1,
                "{path}"
            );
            let nar = self
                .get(&info.url)
                .unwrap_or_else(|| panic!("{path}: narinfo points to missing {}", info.url));
            assert_eq!(Some(nar.len() as u64), info.file_size, "{path}");
            assert_eq!(Some(Sha256::digest(&nar)), info.file_hash, "{path}");
            for r in &info.references {
                let r = r.to_absolute("/nix/store");
                assert!(
                    closure.contains(&r),
                    "{path}: reference {r} outside the closure"
                );
            }
        }
    }
}

/// The closures of `paths`, as real Nix computes them.
fn closure_of(paths: &[String]) -> BTreeSet<String> {
    paths.iter().flat_map(|p| nix_closure(p)).collect()
}

/// The S3 test bucket (a fresh prefix is not possible for Nix, so the bucket is shared
/// with other tests: every path here is fresh) or, without S3, a file:// cache.
fn destination(dir: &Path) -> (String, String, CacheView) {
    match s3_env() {
        Some(env) => (
            env.url(""),
            env.http_url.clone(),
            CacheView::S3(env.client()),
        ),
        None => {
            let cache = dir.join("cache");
            let url = format!("file://{}", cache.display());
            (url.clone(), url, CacheView::File(cache))
        }
    }
}

#[test]
fn post_build_hook_hands_every_build_to_the_daemon_and_nix_substitutes_the_closures() {
    let dir = tempdir();
    let key = nix_generate_key("hook-test");
    let (url, nix_url, view) = destination(dir.path());
    let daemon = Daemon::signed(dir.path(), &url, &key);
    // Nix runs post-build-hook without arguments: a wrapper names the socket.
    let wrapper = dir.path().join("upload-hook");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} hook --socket {} --state-dir {}\n",
            env!("CARGO_BIN_EXE_narflow"),
            daemon.socket.display(),
            daemon.state.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let expr_dir = tempdir();
    let u = unique("hooked");
    // Two independent chains in one build, 8 derivations each.
    let mut expr = String::from("let\n");
    for c in 0..2 {
        for i in 0..8 {
            let dep = if i == 0 {
                String::new()
            } else {
                format!("${{c{c}d{}}}", i - 1)
            };
            expr.push_str(&format!(
                "  c{c}d{i} = derivation {{ name = \"hooked-{c}-{i}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {u} {dep} > $out\" ]; }};\n"
            ));
        }
    }
    expr.push_str("in [ c0d7 c1d7 ]\n");
    std::fs::write(expr_dir.path().join("default.nix"), expr).unwrap();
    let out = run(Command::new("nix-build")
        .arg(expr_dir.path().join("default.nix"))
        .arg("--no-out-link")
        .args(["--option", "substituters", ""])
        .args(["--option", "post-build-hook", wrapper.to_str().unwrap()]));
    let outputs: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(outputs.len(), 2);
    let status = daemon.wait_idle();
    // Every build ran the hook once: 16 paths queued and done.
    assert_eq!(status["done"], 16, "{status}");
    assert_eq!(status["failing"], 0, "{status}");
    let closure = closure_of(&outputs);
    assert_eq!(closure.len(), 16);
    view.assert_complete(&closure, &key);
    assert_nix_substitutes(&nix_url, &key, &closure.into_iter().collect::<Vec<_>>());
}

/// 200 store paths with references: 40 chained derivations and 160 added files of up to
/// 1.5 MiB of incompressible bytes (so uploads take long enough to be interrupted).
fn two_hundred_paths(tag: &str) -> Vec<String> {
    let last = nix_build_chain(tag, 40);
    let mut paths = nix_closure(&last);
    assert_eq!(paths.len(), 40);
    let dir = tempdir();
    let mut files = Vec::new();
    for i in 0..160u64 {
        let f = dir.path().join(unique(&format!("{tag}-{i}")));
        write_random_file(&f, (i * 9973) % (1536 << 10) + 1, &f.display().to_string());
        files.push(f);
    }
    let added = stdout(Command::new("nix-store").arg("--add").args(&files));
    paths.extend(added.lines().map(str::to_owned));
    assert_eq!(paths.len(), 200);
    paths
}

fn kill_9_at_random_moments(dest_is_s3: bool) {
    let dir = tempdir();
    let key = nix_generate_key("crash-test");
    let (url, nix_url, view) = if dest_is_s3 {
        match destination(dir.path()) {
            d @ (_, _, CacheView::S3(_)) => d,
            _ => return,
        }
    } else {
        let cache = dir.path().join("cache");
        let url = format!("file://{}", cache.display());
        (url.clone(), url, CacheView::File(cache))
    };
    let paths = two_hundred_paths(if dest_is_s3 { "crash-s3" } else { "crash" });
    // One compression thread: uploads are slower, so more kills land mid-upload.
    let mut daemon = Daemon::start(
        dir.path(),
        &url,
        &["--key-file", key.secret.to_str().unwrap(), "--jobs", "1"],
    );
    // A cheap deterministic random sequence (the seed is in the failure message).
    let seed = std::process::id() as u64;
    let mut x = seed | 1;
    let mut rand = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let groups: Vec<&[String]> = paths.chunks(10).collect();
    let mut spooled = 0;
    let mut mid_upload = 0;
    for (round, group) in groups.iter().enumerate() {
        // Some hand-offs happen while the daemon is down: they go to the spool.
        let down = round % 4 == 3;
        if down {
            daemon.kill9();
        }
        let out = daemon.hook(group);
        if down {
            assert!(stderr(&out).contains("spooled"), "{}", stderr(&out));
            spooled += 1;
            daemon.restart();
        }
        // Every other kill waits until an upload is under way; the others land anywhere
        // (start-up, spool drain, idle).
        if round % 2 == 0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while daemon.status()["in_flight"] == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(rand(3)));
        } else {
            std::thread::sleep(Duration::from_millis(rand(250)));
        }
        if daemon.status()["in_flight"] != 0 {
            mid_upload += 1;
        }
        daemon.kill9();
        daemon.restart();
    }
    assert_eq!(groups.len(), 20);
    assert!(spooled >= 5);
    println!("seed {seed}: {mid_upload} of 20 kills landed while a batch was uploading");
    assert!(
        mid_upload >= 5,
        "seed {seed}: only {mid_upload} kills were mid-upload"
    );
    // Five more kills once everything is queued, while the rest uploads.
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(rand(300)));
        daemon.kill9();
        daemon.restart();
    }
    let status = daemon.wait_idle();
    assert_eq!(status["done"], 200, "seed {seed}: {status}");
    assert_eq!(status["failing"], 0, "seed {seed}: {status}");
    let closure = closure_of(&paths);
    view.assert_complete(&closure, &key);
    // Nix agrees: everything substitutes with signatures required.
    assert_nix_substitutes(&nix_url, &key, &paths);
    if let CacheView::File(cache) = &view {
        // No temporary file is left behind as a narinfo or NAR.
        let names: Vec<String> = std::fs::read_dir(cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names.iter().filter(|n| n.ends_with(".narinfo")).count(),
            closure.len()
        );
    }
}

#[test]
fn kill_9_at_random_moments_loses_nothing_file_cache() {
    kill_9_at_random_moments(false);
}

#[test]
fn kill_9_at_random_moments_loses_nothing_s3() {
    kill_9_at_random_moments(true);
}

#[test]
fn the_hook_spools_when_the_daemon_is_down_and_the_daemon_uploads_the_spool_on_start() {
    let dir = tempdir();
    let key = nix_generate_key("spool-test");
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let a = BigPath::new("spooled-a", 1000);
    let b = BigPath::new("spooled-b", 2000);

    // The `narflow-hook` binary (Nix runs the hook without arguments), configured by the
    // environment.
    let link = PathBuf::from(env!("CARGO_BIN_EXE_narflow-hook"));
    let socket = dir.path().join("daemon.sock");
    for p in [&a.path, &b.path] {
        let out = Command::new(&link)
            .env("NARFLOW_SOCKET", &socket)
            .env("NARFLOW_STATE_DIR", &state)
            .env("OUT_PATHS", p)
            .output()
            .unwrap();
        assert!(out.status.success());
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains("cannot reach the daemon"), "{err}");
        assert!(err.contains("spooled 1 paths"), "{err}");
    }
    let spool = std::fs::read_to_string(state.join("spool")).unwrap();
    assert_eq!(spool.lines().count(), 2);
    assert!(spool.contains(&a.path) && spool.contains(&b.path));

    // Neither daemon nor spool: the hook still exits 0, and says the paths are lost.
    let out = hook_at(
        &socket,
        Path::new("/proc/no-such-dir"),
        std::slice::from_ref(&a.path),
    );
    assert!(stderr(&out).contains("NOT queued"), "{}", stderr(&out));
    // A bad command line does not fail the build either.
    let out = Command::new(&link).arg("--no-such-flag").output().unwrap();
    assert!(out.status.success());
    assert!(stderr(&out).contains("nothing queued"), "{}", stderr(&out));

    let daemon = Daemon::signed(dir.path(), &url, &key);
    let status = daemon.wait_idle();
    assert_eq!(status["done"], 2, "{status}");
    assert!(!state.join("spool").exists());
    let view = CacheView::File(cache);
    view.assert_complete(&[a.path.clone(), b.path.clone()].into(), &key);
}

#[test]
fn bad_input_gets_clear_errors_and_the_daemon_keeps_serving() {
    let dir = tempdir();
    let key = nix_generate_key("bad-input");
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    let daemon = Daemon::signed(dir.path(), &url, &key);
    let good = BigPath::new("bad-input-good", 100);
    let out = daemon.hook(&[
        "/nix/store/00000000000000000000000000000000-never-built".into(),
        "/etc/passwd".into(),
        good.path.clone(),
        "not-a-path".into(),
    ]);
    let err = stderr(&out);
    assert!(
        err.contains("00000000000000000000000000000000-never-built: no such store path"),
        "{err}"
    );
    assert!(
        err.contains("\"/etc/passwd\" is not in the Nix store"),
        "{err}"
    );
    assert!(err.contains("not-a-path"), "{err}");
    assert_eq!(err.lines().count(), 3, "{err}");

    // Garbage on the socket: each gets a one-line error, and nothing is queued.
    let replies = [
        daemon.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        daemon.raw(b"ENQUEUE - /nix/store/no-newline-then-close"),
        daemon.raw(b"\xff\xfe\x00garbage\n"),
        daemon.raw(&vec![b'x'; (4 << 20) + 10]),
        daemon.raw(b"\n"),
    ];
    let expected = [
        "ERR unknown request \"GET\"",
        "ERR incomplete request",
        "ERR request is not UTF-8",
        "ERR request longer than",
        "ERR empty request",
    ];
    for (reply, want) in replies.iter().zip(expected) {
        assert!(
            reply.starts_with(want),
            "{reply:?} should start with {want:?}"
        );
    }
    for r in &replies {
        assert_eq!(r.lines().count(), 1, "{r}");
    }
    // A client that connects and closes at once.
    drop(UnixStream::connect(&daemon.socket).unwrap());

    // The socket is private; and even if its mode is widened, the daemon checks who is
    // calling (root and its own uid only).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    if running_as_root() {
        std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_narflow-hook"))
            .arg("--socket")
            .arg(&daemon.socket)
            .arg("--state-dir")
            .arg(&daemon.state)
            .env("OUT_PATHS", &good.path)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            stderr(&out).contains("uid 65534 may not use this daemon"),
            "{}",
            stderr(&out)
        );
    }

    // The daemon still serves, and the good path went up.
    let status = daemon.wait_idle();
    assert_eq!(status["done"], 1, "{status}");
    assert_eq!(status["failing"], 0, "{status}");
    CacheView::File(cache.clone()).assert_complete(&[good.path.clone()].into(), &key);
    let again = BigPath::new("bad-input-after", 100);
    assert!(stderr(&daemon.hook(std::slice::from_ref(&again.path))).is_empty());
    assert_eq!(daemon.wait_idle()["done"], 2);
}

/// A tmpfs mounted for the test (root only), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_for_the_queue_is_a_clear_error_and_nothing_queued_is_lost() {
    let dir = tempdir();
    let key = nix_generate_key("full-disk");
    let Some(_fs) = Tmpfs::mount(&dir.path().join("state"), "4m") else {
        println!("full-disk test skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    // An unreachable cache keeps the first path pending (retrying) throughout.
    let url = "s3://narflow-none?endpoint=http://127.0.0.1:9&region=x&retries=0";
    let daemon = Daemon::signed(dir.path(), url, &key);
    let first = BigPath::new("full-disk-first", 100);
    assert!(stderr(&daemon.hook(std::slice::from_ref(&first.path))).is_empty());
    // Fill the file system.
    let filler = daemon.state.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let mut later = Vec::new();
    for i in 0..20 {
        later.push(BigPath::new(&format!("full-disk-{i}"), 100));
    }
    let later_paths: Vec<String> = later.iter().map(|p| p.path.clone()).collect();
    let out = daemon.hook(&later_paths);
    let err = stderr(&out);
    assert!(err.contains("refused"), "{err}");
    assert!(err.contains("full"), "{err}");
    assert!(err.contains("NOT queued"), "{err}");
    // Still serving; the first path is still queued.
    let status = daemon.status();
    assert_eq!(status["pending"], 1, "{status}");
    // Space again: the hand-off works, and nothing was lost.
    std::fs::remove_file(&filler).unwrap();
    let out = daemon.hook(&later_paths);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(daemon.status()["pending"], 21);
}

#[test]
fn a_path_collected_before_upload_is_dropped_with_a_warning_not_retried() {
    let dir = tempdir();
    let key = nix_generate_key("gc-test");
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let socket = dir.path().join("daemon.sock");
    let kept = BigPath::new("gc-kept", 100);
    let gone = BigPath::new("gc-gone", 100);
    // Spooled while the daemon is down, then collected before it starts.
    hook_at(&socket, &state, &[kept.path.clone(), gone.path.clone()]);
    run(Command::new("nix-store").arg("--delete").arg(&gone.path));
    let daemon = Daemon::signed(dir.path(), &url, &key);
    let status = daemon.wait_idle();
    // The spool named a path that no longer exists: refused when drained.
    assert_eq!(status["done"], 1, "{status}");
    assert!(
        daemon.log_text().contains("no such store path"),
        "{}",
        daemon.log_text()
    );

    assert!(!state.join("spool").exists());
    drop(daemon);

    // Queued while it exists, collected before an upload succeeds: dropped, with the
    // reason, and not retried. An unreachable cache holds the path in retry meanwhile.
    let dir = tempdir();
    let url = "s3://narflow-none?endpoint=http://127.0.0.1:9&region=x&retries=0";
    let daemon = Daemon::signed(dir.path(), url, &key);
    let third = BigPath::new("gc-third", 100);
    assert!(stderr(&daemon.hook(std::slice::from_ref(&third.path))).is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    while daemon.status()["failing"] != 1 {
        assert!(Instant::now() < deadline, "{}", daemon.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    run(Command::new("nix-store").arg("--delete").arg(&third.path));
    // The retry comes after the first backoff (5 s).
    let status = daemon.wait_idle();
    assert_eq!(status["dropped"], 1, "{status}");
    assert_eq!(status["failing"], 0, "{status}");
    assert_eq!(status["dropped_paths"][0]["path"], third.path.as_str());
    assert!(
        status["dropped_paths"][0]["why"]
            .as_str()
            .unwrap()
            .contains("garbage-collected"),
        "{status}"
    );
    assert!(
        daemon.log_text().contains("dropped"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn failures_stay_visible_and_sigterm_stops_cleanly_keeping_pending_work() {
    let dir = tempdir();
    let key = nix_generate_key("sigterm");
    let url = "s3://narflow-none?endpoint=http://127.0.0.1:9&region=x&retries=0";
    let mut daemon = Daemon::start(
        dir.path(),
        url,
        &[
            "--key-file",
            key.secret.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let p = BigPath::new("sigterm", 100);
    daemon.hook(std::slice::from_ref(&p.path));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = daemon.status();
        if s["failing"] == 1 {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let f = &status["failures"][0];
    assert_eq!(f["path"], p.path.as_str());
    assert_eq!(f["attempts"], 1);
    assert_eq!(
        (&f["kind"], &f["retry"]),
        (&"cache".into(), &"transient".into()),
        "{f}"
    );
    // The metrics count the failed attempt by kind and retry class.
    let failures = scrape(&metrics_addr(&daemon));
    let n = failures[r#"narflow_path_failures_total{kind="cache",retry="transient"}"#];
    let attempts = daemon.status()["failures"][0]["attempts"].as_u64().unwrap();
    assert!(
        n >= 1.0 && n <= attempts as f64,
        "{n} failures, {attempts} attempts"
    );
    assert!(
        f["last_error"].as_str().unwrap().contains("127.0.0.1:9"),
        "{f}"
    );
    // `narflow status` says so, with exit code 1.
    let out = narflow()
        .args(["status", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    // An unreachable endpoint is transient: failing, retried with the usual backoff, but
    // not a path that needs someone's attention.
    assert!(
        text.contains("1 pending (1 failing, 0 needing attention)"),
        "{text}"
    );
    assert!(!text.contains("needs attention"), "{text}");
    let next = f["next_attempt_ms"].as_i64().unwrap() - narflow::daemon::queue::now_ms();
    assert!(
        next <= 5000,
        "next attempt in {next} ms, not after the first backoff"
    );

    assert!(daemon.terminate().success(), "{}", daemon.log_text());
    assert!(!daemon.socket.exists(), "the socket is removed");
    // Without a daemon, status reads the queue: the path is still pending.
    let out = narflow()
        .args(["status", "--json", "--socket"])
        .arg(&daemon.socket)
        .arg("--state-dir")
        .arg(&daemon.state)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"], false);
    assert_eq!(v["pending"], 1, "{v}");
    // Two daemons cannot share a state directory.
    daemon.restart();
    let out = narflow()
        .args(["daemon", "--to", url, "--unsigned", "--socket"])
        .arg(dir.path().join("other.sock"))
        .arg("--state-dir")
        .arg(&daemon.state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("another narflow daemon is using the state directory"),
        "{}",
        stderr(&out)
    );
}

/// Connects to `socket` without waiting until its backlog is full (its daemon must not be
/// accepting: stopped); the returned connections hold the backlog full.
fn fill_backlog(socket: &Path) -> Vec<rustix::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let addr = SocketAddrUnix::new(socket).unwrap();
    let mut held = Vec::new();
    loop {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => held.push(fd),
            Err(rustix::io::Errno::AGAIN) => return held,
            Err(e) => panic!("connect {}: {e}", socket.display()),
        }
    }
}

/// Runs `cmd`, killing it if it has not exited after `limit`; returns its output and how
/// long it ran, or `None` when it had to be killed.
fn run_within(cmd: &mut Command, limit: Duration) -> Option<(Output, Duration)> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = started.elapsed();
    Some((child.wait_with_output().unwrap(), took))
}

#[test]
fn a_stopped_daemon_with_a_full_backlog_never_holds_up_the_hook() {
    let dir = tempdir();
    let key = nix_generate_key("stopped");
    let url = format!("file://{}", dir.path().join("cache").display());
    let daemon = Daemon::signed(dir.path(), &url, &key);
    let p = BigPath::new("stopped-daemon", 100);
    daemon.signal("STOP");
    let held = fill_backlog(&daemon.socket);
    let timeout = Duration::from_millis(300);
    let mut slowest = Duration::ZERO;
    for i in 0..100 {
        let ran = run_within(
            Command::new(env!("CARGO_BIN_EXE_narflow-hook"))
                .arg("--socket")
                .arg(&daemon.socket)
                .arg("--state-dir")
                .arg(&daemon.state)
                .arg("--timeout")
                .arg(timeout.as_secs_f64().to_string())
                .env("OUT_PATHS", &p.path),
            Duration::from_secs(20),
        );
        let Some((out, took)) = ran else {
            daemon.signal("CONT");
            panic!("hook {i} still waits for the stopped daemon after 20 s");
        };
        assert!(out.status.success());
        assert!(stderr(&out).contains("spooled 1 paths"), "{}", stderr(&out));
        // The bound the hook promises: the daemon's timeout, plus the spool append.
        assert!(
            took < timeout + Duration::from_millis(500),
            "hook {i} took {took:?}"
        );
        slowest = slowest.max(took);
    }
    println!("slowest of 100 hooks against a stopped daemon: {slowest:?}");
    let spool = std::fs::read_to_string(daemon.state.join("spool")).unwrap();
    assert_eq!(spool.lines().count(), 100);
    drop(held);
    daemon.signal("CONT");
    let status = daemon.wait_idle();
    assert_eq!(status["done"], 1, "{status}");
    assert!(!daemon.state.join("spool").exists());
}

#[test]
fn while_a_large_upload_runs_the_spool_is_drained_and_sigterm_cancels_it_in_time() {
    let dir = tempdir();
    let key = nix_generate_key("sigterm-big");
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    // Incompressible, through xz on one thread: minutes of upload.
    let big = BigPath::new("sigterm-big", 200 << 20);
    let small = BigPath::new("spooled-mid-batch", 100);
    let shutdown = Duration::from_secs(4);
    let mut daemon = Daemon::start(
        dir.path(),
        &url,
        &[
            "--key-file",
            key.secret.to_str().unwrap(),
            "--compression",
            "xz",
            "--jobs",
            "1",
            "--shutdown-timeout",
            &shutdown.as_secs().to_string(),
        ],
    );
    assert!(stderr(&daemon.hook(std::slice::from_ref(&big.path))).is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = daemon.status();
        if s["in_flight"] == 1 && s["since_start"]["nar_bytes"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no upload under way: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // A hand-off spooled while the large upload runs (by a hook that cannot reach the
    // daemon) is queued and published while the large upload still runs.
    let out = hook_at(
        &dir.path().join("elsewhere.sock"),
        &daemon.state,
        std::slice::from_ref(&small.path),
    );
    assert!(stderr(&out).contains("spooled"), "{}", stderr(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = daemon.status();
        assert!(
            !cache.join(narinfo_key(&big.path)).exists(),
            "the large upload ended first: {s}"
        );
        if s["done"] == 1 && cache.join(narinfo_key(&small.path)).exists() {
            assert_eq!(
                (&s["pending"], &s["in_flight"]),
                (&1.into(), &1.into()),
                "{s}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the spool was not drained and published during the large upload: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGTERM mid-upload: the process exits 0 within the shutdown timeout.
    let started = Instant::now();
    let pid = daemon.pid();
    let mut child = daemon.child.take().unwrap();
    run(Command::new("kill").arg("-TERM").arg(&pid));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("still running 60 s after SIGTERM:\n{}", daemon.log_text());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    println!("SIGTERM to exit with a 200 MiB upload in flight: {took:?}");
    assert!(status.success(), "{status}\n{}", daemon.log_text());
    assert!(
        took < shutdown + Duration::from_secs(1),
        "took {took:?}\n{}",
        daemon.log_text()
    );
    // Nothing was published for it; it is still pending, and the cancelled upload is not
    // counted as a failed attempt.
    assert!(!cache.join(narinfo_key(&big.path)).exists());
    let out = narflow()
        .args(["status", "--json", "--socket"])
        .arg(&daemon.socket)
        .arg("--state-dir")
        .arg(&daemon.state)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"], false, "{v}");
    assert_eq!(
        (
            v["pending"].as_u64(),
            v["failing"].as_u64(),
            v["done"].as_u64()
        ),
        (Some(1), Some(0), Some(1)),
        "{v}"
    );
}

#[test]
fn a_live_daemon_keeps_its_socket_and_a_stopping_one_removes_only_its_own() {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().join("cache").display());
    let a = Daemon::start(dir.path(), &url, &["--unsigned"]);
    // A stopped daemon with a full backlog is alive: a second one must not take over.
    a.signal("STOP");
    let held = fill_backlog(&a.socket);
    let other_state = dir.path().join("state-b");
    let second = run_within(
        narflow()
            .args(["daemon", "--unsigned", "--to", &url, "--socket"])
            .arg(&a.socket)
            .arg("--state-dir")
            .arg(&other_state),
        Duration::from_secs(20),
    );
    drop(held);
    a.signal("CONT");
    let (out, _) = second.expect("the second daemon hangs on the live socket");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another daemon is listening there"),
        "{}",
        stderr(&out)
    );
    assert!(a.try_status().is_ok(), "the first daemon lost its socket");

    // The socket path is taken over (the file was removed, another daemon bound it):
    // the first daemon's shutdown leaves the new socket alone.
    let mut a = a;
    std::fs::remove_file(&a.socket).unwrap();
    let b_dir = dir.path().join("b");
    std::fs::create_dir(&b_dir).unwrap();
    let mut b = Daemon {
        child: None,
        socket: a.socket.clone(),
        state: other_state,
        log: b_dir.join("daemon.log"),
        args: ["daemon", "--unsigned", "--to", &url]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    b.restart();
    assert!(a.terminate().success());
    assert!(
        b.try_status().is_ok(),
        "the stopping daemon removed another's socket"
    );
    assert!(b.terminate().success());
    assert!(!b.socket.exists());
}

#[test]
fn a_state_or_socket_directory_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let url = format!("file://{}", dir.path().join("cache").display());
    let start = |state: &Path, socket: &Path| {
        run_within(
            narflow()
                .args(["daemon", "--unsigned", "--to", &url, "--socket"])
                .arg(socket)
                .arg("--state-dir")
                .arg(state),
            Duration::from_secs(20),
        )
        .expect("the daemon started on an unsafe directory")
        .0
    };
    let socket = dir.path().join("daemon.sock");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = start(&state, &socket);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "state directory {}: refused: writable by group or others (mode 777)",
            state.display()
        )),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!socket.exists());
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    if running_as_root() {
        run(Command::new("chown").arg("65534").arg(&state));
        let out = start(&state, &socket);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            stderr(&out).contains("refused: owned by uid 65534, not by the daemon's uid 0"),
            "{}",
            stderr(&out)
        );
        run(Command::new("chown").arg("0").arg(&state));
    }
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = start(&state, &open.join("daemon.sock"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!(
            "socket directory {}: refused: writable",
            open.display()
        )),
        "{}",
        stderr(&out)
    );
}

/// A cache that refuses the narinfo of one path (access denied: permanent) and counts
/// orphan sweeps; everything else goes to a file:// cache.
#[derive(Debug)]
struct RefusingCache {
    inner: Box<dyn narflow::cache::BinaryCache>,
    refuse: Option<narflow::format::store_path::StorePath>,
    sweeps: std::sync::Arc<std::sync::Mutex<Vec<Duration>>>,
}

impl RefusingCache {
    fn check(
        &self,
        narinfos: &[(narflow::format::store_path::StorePath, String)],
    ) -> Result<(), narflow::cache::CacheError> {
        match &self.refuse {
            Some(bad) if narinfos.iter().any(|(p, _)| p == bad) => {
                Err(narflow::cache::CacheError::Remote {
                    cache: "test".into(),
                    key: format!("{}.narinfo", bad.hash_part()),
                    message: "access denied".into(),
                    transient: false,
                })
            }
            _ => Ok(()),
        }
    }
}

impl narflow::cache::BinaryCache for RefusingCache {
    fn url(&self) -> &str {
        self.inner.url()
    }
    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), narflow::cache::CacheError> {
        self.inner.ensure_cache_info(store_dir)
    }
    fn has_narinfo(
        &self,
        path: &narflow::format::store_path::StorePath,
    ) -> Result<bool, narflow::cache::CacheError> {
        self.inner.has_narinfo(path)
    }
    fn has_object(&self, key: &str) -> Result<bool, narflow::cache::CacheError> {
        self.inner.has_object(key)
    }
    fn object_size(&self, key: &str) -> Result<Option<u64>, narflow::cache::CacheError> {
        self.inner.object_size(key)
    }
    fn get_narinfo(
        &self,
        path: &narflow::format::store_path::StorePath,
    ) -> Result<Option<String>, narflow::cache::CacheError> {
        self.inner.get_narinfo(path)
    }
    fn get_text(&self, key: &str) -> Result<Option<String>, narflow::cache::CacheError> {
        self.inner.get_text(key)
    }
    fn begin_nar(
        &self,
        nar_size: u64,
    ) -> Result<Box<dyn narflow::cache::NarUpload>, narflow::cache::CacheError> {
        self.inner.begin_nar(nar_size)
    }
    fn put_narinfo(
        &self,
        path: &narflow::format::store_path::StorePath,
        text: &str,
    ) -> Result<(), narflow::cache::CacheError> {
        self.check(&[(path.clone(), String::new())])?;
        self.inner.put_narinfo(path, text)
    }
    fn put_narinfos(
        &self,
        narinfos: &[(narflow::format::store_path::StorePath, String)],
    ) -> Result<(), narflow::cache::CacheError> {
        self.check(narinfos)?;
        self.inner.put_narinfos(narinfos)
    }
    fn sync(&self) -> Result<(), narflow::cache::CacheError> {
        self.inner.sync()
    }
    fn sweep_orphans(&self, grace: Duration) -> Result<u64, narflow::cache::CacheError> {
        self.sweeps.lock().unwrap().push(grace);
        self.inner.sweep_orphans(grace)
    }
}

/// A daemon running in this process (so it can be given a test cache); stopped on drop.
struct InProcessDaemon {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessDaemon {
    fn start(dir: &Path, cache: RefusingCache) -> InProcessDaemon {
        use narflow::format::compression::{Compression, CompressionSettings};
        let socket = dir.join("daemon.sock");
        let opts = narflow::pipeline::PushOptions::new(
            CompressionSettings::new(Compression::Zstd, None).unwrap(),
            Vec::new(),
        );
        let daemon = narflow::daemon::Daemon::bind(narflow::daemon::DaemonConfig {
            socket: socket.clone(),
            state_dir: dir.join("state"),
            socket_group: None,
            opts,
            batch: narflow::daemon::DEFAULT_BATCH,
            shutdown_timeout: Duration::from_secs(10),
            metrics_listen: None,
            watch_store: None,
            resume_max_age: None,
        })
        .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let store = narflow::store::LocalStore::open(
                "/nix/store",
                Path::new("/nix/var/nix/db/db.sqlite"),
            );
            rt.block_on(daemon.run(store, Box::new(cache), async {
                let _ = stopped.await;
            }))
            .unwrap();
        });
        InProcessDaemon {
            socket,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn status(&self) -> serde_json::Value {
        let reply = exchange(&self.socket, "STATUS\n", Duration::from_secs(10)).unwrap();
        serde_json::from_str(reply.strip_prefix("OK ").unwrap().trim_end()).unwrap()
    }
}

impl Drop for InProcessDaemon {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn file_cache(dir: &Path) -> Box<dyn narflow::cache::BinaryCache> {
    let url = format!("file://{}", dir.display());
    let url = narflow::cache::url::CacheUrl::parse(&url).unwrap();
    narflow::cache::open(&url, &open_options(&url)).unwrap()
}

#[test]
fn one_bad_path_does_not_hold_back_its_batch_and_needs_attention() {
    let dir = tempdir();
    let good: Vec<BigPath> = (0..6)
        .map(|i| BigPath::new(&format!("batch-good-{i}"), 1000))
        .collect();
    let bad = BigPath::new("batch-bad", 1000);
    let bad_path =
        narflow::format::store_path::StorePath::from_absolute_path(&bad.path, "/nix/store")
            .unwrap();
    let cache_dir = dir.path().join("cache");
    let daemon = InProcessDaemon::start(
        dir.path(),
        RefusingCache {
            inner: file_cache(&cache_dir),
            refuse: Some(bad_path),
            sweeps: Default::default(),
        },
    );
    // One hand-off: one batch, with the bad path in the middle.
    let mut paths: Vec<String> = good.iter().map(|p| p.path.clone()).collect();
    paths.insert(3, bad.path.clone());
    hook_at(&daemon.socket, &dir.path().join("state"), &paths);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let s = daemon.status();
        if s["done"] == 6 && s["needs_attention"] == 1 {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let f = &status["failures"][0];
    assert_eq!(f["path"], bad.path.as_str(), "{status}");
    assert_eq!(f["needs_attention"], true, "{status}");
    assert_eq!(
        (&f["kind"], &f["retry"]),
        (&"cache".into(), &"permanent".into()),
        "{f}"
    );
    assert!(
        f["last_error"].as_str().unwrap().contains("access denied"),
        "{status}"
    );
    // Retried slowly: not before an hour.
    let next = f["next_attempt_ms"].as_i64().unwrap() - narflow::daemon::queue::now_ms();
    assert!(next > 3_000_000, "next attempt in {next} ms");
    for p in &good {
        assert!(cache_dir.join(narinfo_key(&p.path)).exists(), "{}", p.path);
    }
    assert!(!cache_dir.join(narinfo_key(&bad.path)).exists());
    // `narflow status` shows it, with the cause, and exits 1.
    let out = narflow()
        .args(["status", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("needs attention: {} (1 attempts", bad.path)),
        "{text}"
    );
    assert!(text.contains("access denied"), "{text}");
    assert!(text.contains("cache error, retrying cannot help"), "{text}");
}

/// Serves one connection on `socket` with `reply`, as a daemon of another version would.
fn answer_once(socket: &Path, reply: String) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8];
        while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert_eq!(line, b"STATUS");
        s.write_all(reply.as_bytes()).unwrap();
    })
}

#[test]
fn a_status_with_a_missing_field_is_an_error_naming_it_not_a_zero() {
    let dir = tempdir();
    let socket = dir.path().join("daemon.sock");
    // What a daemon sends, less `failing`: read with a default of 0, it would say
    // nothing fails and exit 0.
    let mut status = serde_json::json!({
        "daemon": true, "daemon_error": null, "pending": 1, "failing": 1,
        "needs_attention": 0, "done": 0, "dropped": 0, "failures": [], "dropped_paths": [],
        "in_flight": 0, "uptime_seconds": 1, "last_recorded_unix_ms": 0,
        "since_start": {"uploaded": 0, "nar_bytes": 0},
        "recent": {"window_seconds": 60, "uploaded_per_second": 0.0, "nar_mb_per_second": 0.0},
        "last_batch": null, "watch": null, "large_uploads": [],
    });
    let full = answer_once(&socket, format!("OK {status}\n"));
    let out = narflow()
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    full.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    std::fs::remove_file(&socket).unwrap();
    status.as_object_mut().unwrap().remove("failing");
    let short = answer_once(&socket, format!("OK {status}\n"));
    let out = narflow()
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    short.join().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("missing field `failing`"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_daemon_sweeps_orphaned_uploads_at_start_with_a_day_of_grace() {
    let dir = tempdir();
    let sweeps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let _daemon = InProcessDaemon::start(
        dir.path(),
        RefusingCache {
            inner: file_cache(&dir.path().join("cache")),
            refuse: None,
            sweeps: sweeps.clone(),
        },
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while sweeps.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no sweep at start");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        sweeps.lock().unwrap()[0],
        Duration::from_secs(24 * 3600),
        "grace"
    );
}

/// The systemd unit makes the Nix database file read-only and leaves its directory
/// writable (for SQLite's `-wal` and `-shm`): the daemon's read-only connection must see a
/// path whose row is only in the WAL (Nix has the database open, not checkpointed), and
/// open the database when Nix has it closed (no `-wal`, no `-shm`).
#[test]
fn the_nix_database_is_read_with_the_database_file_read_only() {
    if !running_as_root() {
        println!("read-only database test skipped: needs root (mount namespace)");
        return;
    }
    let dir = tempdir();
    let db_dir = dir.path().join("db");
    std::fs::create_dir(&db_dir).unwrap();
    let p = BigPath::new("ro-db", 1000);
    // A consistent copy of the Nix database, to play Nix's part on.
    let copy = db_dir.join("db.sqlite");
    rusqlite::Connection::open_with_flags(
        "/nix/var/nix/db/db.sqlite",
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
    .execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
    .unwrap();
    std::fs::copy("/nix/var/nix/db/schema", db_dir.join("schema")).unwrap();
    let writer = rusqlite::Connection::open(&copy).unwrap();
    writer
        .execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TEMP TABLE keep AS SELECT * FROM ValidPaths WHERE path = '{p}';
             DELETE FROM ValidPaths WHERE path = '{p}';
             PRAGMA wal_checkpoint(TRUNCATE);
             INSERT INTO ValidPaths SELECT * FROM keep;",
            p = p.path
        ))
        .unwrap();
    assert!(db_dir.join("db.sqlite-shm").exists());
    let push = |cache: &Path| {
        let script = format!(
            "mount --bind {db} /nix/var/nix/db \
             && for f in db.sqlite schema; do mount --bind /nix/var/nix/db/$f /nix/var/nix/db/$f \
                && mount -o remount,ro,bind /nix/var/nix/db/$f || exit 1; done \
             && ! (echo >> /nix/var/nix/db/db.sqlite) 2>/dev/null \
             && exec {narflow} push --unsigned --to file://{cache} {path}",
            db = db_dir.display(),
            narflow = env!("CARGO_BIN_EXE_narflow"),
            cache = cache.display(),
            path = p.path
        );
        let out = Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            cache.join(narinfo_key(&p.path)).exists(),
            "{}",
            stderr(&out)
        );
    };
    // The row is only in the WAL; the -shm is Nix's (here: the writer's).
    push(&dir.path().join("cache-wal"));
    // Nix closed the database: no WAL, no -shm.
    drop(writer);
    assert!(!db_dir.join("db.sqlite-wal").exists());
    assert!(!db_dir.join("db.sqlite-shm").exists());
    push(&dir.path().join("cache-no-wal"));
}

#[test]
fn push_sweep_orphans_sweeps_with_a_day_of_grace_after_the_push() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    let p = BigPath::new("push-sweep", 100);
    // A leftover younger than the grace period: an upload that may still be running.
    std::fs::create_dir_all(cache.join("nar")).unwrap();
    let young = cache.join("nar").join(".narflow-tmp-young");
    std::fs::write(&young, "x").unwrap();
    // And one two days old: what a killed push left.
    let old = cache.join("nar").join(".narflow-tmp-old");
    std::fs::write(&old, "x").unwrap();
    let two_days = std::time::SystemTime::now() - Duration::from_secs(2 * 86400);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_days)
        .unwrap();
    let out = narflow()
        .args([
            "push",
            "--unsigned",
            "--sweep-orphans",
            "--to",
            &url,
            &p.path,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("leftovers of interrupted uploads older than 24 h"),
        "{}",
        stderr(&out)
    );
    assert!(cache.join(narinfo_key(&p.path)).exists());
    assert!(young.exists(), "a leftover younger than a day was swept");
    assert!(!old.exists(), "a leftover two days old was not swept");
}

/// The metrics address a daemon logged (with port 0 the kernel picks the port).
fn metrics_addr(daemon: &Daemon) -> String {
    let log = daemon.log_text();
    log.lines()
        .find_map(|l| {
            let rest = l.split("serving metrics on http://").nth(1)?;
            rest.strip_suffix("/metrics").map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
}

/// `GET path` from `addr`: the status line, the headers and the body.
fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_owned(), body.to_owned())
}

/// The samples of a scrape: `name{labels}` as written → value.
fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    let (status, headers, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(
        headers.contains("Content-Type: application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            assert!(l.starts_with("narflow_"), "{l}");
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn metrics_are_served_and_count_the_paths_handed_off() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", cache.display());
    let mut daemon = Daemon::start(
        dir.path(),
        &url,
        &["--unsigned", "--metrics-listen", "127.0.0.1:0"],
    );
    let addr = metrics_addr(&daemon);
    let before = scrape(&addr);
    let v = |m: &std::collections::HashMap<String, f64>, k: &str| {
        *m.get(k).unwrap_or_else(|| panic!("no {k} in {m:?}"))
    };
    let paths: Vec<BigPath> = (0..5)
        .map(|i| BigPath::new(&format!("metrics-{i}"), 3000 + i * 1000))
        .collect();
    let names: Vec<String> = paths.iter().map(|p| p.path.clone()).collect();
    daemon.hook(&names[..2]);
    daemon.hook(&names[2..]);
    let status = daemon.wait_idle();
    assert_eq!(status["done"], 5, "{status}");
    let after = scrape(&addr);
    let nar_bytes: u64 = names
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(cache.join(narinfo_key(p))).unwrap();
            narinfo_field(&text, "NarSize")
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    let moved = |k: &str| v(&after, k) - v(&before, k);
    assert_eq!(moved("narflow_uploaded_paths_total"), 5.0);
    assert_eq!(moved("narflow_uploaded_nar_bytes_total"), nar_bytes as f64);
    assert_eq!(moved("narflow_handoff_to_published_seconds_count"), 5.0);
    assert_eq!(v(&after, r#"narflow_queue_paths{state="pending"}"#), 0.0);
    assert_eq!(v(&after, r#"narflow_queue_paths{state="in_flight"}"#), 0.0);
    assert_eq!(v(&after, r#"narflow_queue_paths{state="done"}"#), 5.0);
    // Every stage that ran says how long it worked, and with how many threads.
    for stage in ["walk", "hash", "sink"] {
        assert!(
            v(
                &after,
                &format!(r#"narflow_stage_busy_seconds_total{{stage="{stage}"}}"#)
            ) > 0.0,
            "{after:?}"
        );
        assert!(
            v(
                &after,
                &format!(r#"narflow_stage_threads{{stage="{stage}"}}"#)
            ) >= 1.0
        );
    }
    // Nothing failed, and a local directory sends no requests.
    assert!(
        !after
            .keys()
            .any(|k| k.starts_with("narflow_path_failures") || k.starts_with("narflow_cache_req")),
        "{after:?}"
    );
    let (status, _, _) = http_get(&addr, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // A taken address is a startup error naming it, and leaves no socket behind.
    let other = dir.path().join("other.sock");
    let out = narflow()
        .args([
            "daemon",
            "--to",
            &url,
            "--unsigned",
            "--metrics-listen",
            &addr,
        ])
        .arg("--socket")
        .arg(&other)
        .arg("--state-dir")
        .arg(dir.path().join("other-state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("metrics address {addr}")),
        "{}",
        stderr(&out)
    );
    assert!(!other.exists());
    assert!(daemon.terminate().success(), "{}", daemon.log_text());
}
