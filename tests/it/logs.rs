//! `--upload-logs` against real Nix 2.8: a fresh `nix-build`'s log reaches the cache as
//! `log/<drv>`, and `nix log --store URL <out>` prints it; through `narflow push`, through
//! the daemon (hand-off by `narflow hook`), and on S3 with its Content-Type. Logs far
//! larger than `--memory` go up whole while the peak RSS stays within the budget.
use crate::helpers::*;
use crate::memory::{assert_bounded, peak_rss_of_push_with};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Builds a fresh derivation whose build prints a line of its own; returns (output path,
/// its .drv, the line).
fn build_with_log(tag: &str) -> (String, String, String) {
    let line = unique(&format!("build-log-line-{tag}"));
    let out = nix_build(&format!(
        "derivation {{ name = \"{tag}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
         args = [ \"-c\" \"echo {line}; echo built > $out\" ]; }}"
    ));
    assert_eq!(out.len(), 1, "{out:?}");
    let drv = stdout(Command::new("nix-store").args(["-q", "--deriver", &out[0]]));
    (out[0].clone(), drv, line)
}

fn base_name(full: &str) -> &str {
    full.rsplit('/').next().unwrap()
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// What `nix log --store URL PATH` prints.
fn nix_log(url: &str, path: &str) -> String {
    stdout(
        Command::new("nix")
            .args(["log", "--store", url, path])
            .args(["--option", "substituters", ""]),
    )
}

fn push(url: &str, extra: &[&str], path: &str) -> serde_json::Value {
    let out = run(narflow()
        .args(["push", "--unsigned", "--json", "--to", url])
        .args(extra)
        .arg(path));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn push_with_upload_logs_makes_nix_log_print_the_build_log() {
    let (out, drv, line) = build_with_log("log-push");
    let cache = tempdir();
    let url = file_url(cache.path());
    let summary = push(&url, &["--upload-logs"], &out);
    assert_eq!(
        summary["logs"],
        serde_json::json!({"uploaded": 1, "missing": 0, "failed": 0}),
        "{summary}"
    );
    assert!(cache.path().join("log").join(base_name(&drv)).is_file());
    assert!(nix_log(&url, &out).contains(&line));
}

#[test]
fn backfill_with_upload_logs_makes_nix_log_print_the_build_log() {
    let (out, drv, line) = build_with_log("log-backfill");
    let cache = tempdir();
    let url = file_url(cache.path());
    let key = nix_generate_key(&unique("log-backfill-key"));
    let state = cache.path().join("state.json");
    let o = run(narflow()
        .args(["backfill", "--to", &url, "--json", "--upload-logs"])
        .arg("--key-file")
        .arg(&key.secret)
        .arg("--state")
        .arg(&state)
        .arg(&out));
    let summary: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("backfill --json prints one object");
    assert_eq!(
        summary["logs"],
        serde_json::json!({"uploaded": 1, "missing": 0, "failed": 0}),
        "{summary}"
    );
    assert!(cache.path().join("log").join(base_name(&drv)).is_file());
    assert!(nix_log(&url, &out).contains(&line));
}

#[test]
fn without_upload_logs_no_log_goes_up() {
    let (out, _, _) = build_with_log("log-off");
    let cache = tempdir();
    let summary = push(&file_url(cache.path()), &[], &out);
    assert_eq!(summary["uploaded"], 1, "{summary}");
    assert_eq!(summary["logs"], serde_json::Value::Null, "{summary}");
    assert!(!cache.path().join("log").exists());
}

#[test]
fn a_path_without_a_kept_log_is_counted_missing_not_failed() {
    // `nix-store --add` registers no deriver; a build with keep-build-log off keeps none.
    let dir = tempdir();
    let f = dir.path().join(unique("no-log"));
    std::fs::write(&f, "x").unwrap();
    let added = nix_store_add(&f);
    let line = unique("unlogged");
    let file = dir.path().join("default.nix");
    std::fs::write(
        &file,
        format!(
            "derivation {{ name = \"unlogged\"; system = builtins.currentSystem; builder = \"/bin/sh\"; \
             args = [ \"-c\" \"echo {line}; echo built > $out\" ]; }}"
        ),
    )
    .unwrap();
    let built = stdout(
        Command::new("nix-build")
            .arg(&file)
            .arg("--no-out-link")
            .args(["--option", "substituters", ""])
            .args(["--option", "keep-build-log", "false"]),
    );
    let cache = tempdir();
    let out = run(narflow()
        .args(["push", "--unsigned", "--json", "--upload-logs", "--to"])
        .arg(file_url(cache.path()))
        .args([&added, &built]));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["uploaded"], 2, "{summary}");
    assert_eq!(
        summary["logs"],
        serde_json::json!({"uploaded": 0, "missing": 1, "failed": 0}),
        "{summary}"
    );
}

#[test]
fn the_daemon_with_upload_logs_uploads_the_log_of_a_hooked_build() {
    let (out, drv, line) = build_with_log("log-daemon");
    let dir = tempdir();
    let cache = dir.path().join("cache");
    let url = file_url(&cache);
    let (socket, state) = (dir.path().join("d.sock"), dir.path().join("state"));
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut daemon = narflow()
        .args(["daemon", "--unsigned", "--upload-logs", "--to", &url])
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let daemon_log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    // The hook spools when the daemon is not listening yet; the daemon takes the spool
    // on start, so the hand-off needs no wait for the socket.
    let hook = narflow()
        .arg("hook")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .env("OUT_PATHS", &out)
        .env("DRV_PATH", &drv)
        .output()
        .unwrap();
    assert!(hook.status.success(), "{hook:?}");
    let key = cache.join("log").join(base_name(&drv));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !key.is_file() {
        if let Some(status) = daemon.try_wait().unwrap() {
            panic!("the daemon exited ({status}):\n{}", daemon_log());
        }
        assert!(
            Instant::now() < deadline,
            "no {} in the cache:\n{}",
            key.display(),
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert!(nix_log(&url, &out).contains(&line), "{}", daemon_log());
}

#[test]
fn on_s3_a_log_is_text_plain_utf8() {
    let Some(env) = s3_env() else { return };
    let (out, drv, line) = build_with_log("log-s3");
    let summary = push(&env.url(""), &["--upload-logs"], &out);
    assert_eq!(summary["logs"]["uploaded"], 1, "{summary}");
    let key = format!("log/{}", base_name(&drv));
    let client = env.client();
    let head = client.head(&key).expect("the log object");
    assert_eq!(
        head.content_type.as_deref(),
        Some("text/plain; charset=utf-8")
    );
    let text = String::from_utf8(client.get(&key).unwrap()).unwrap();
    assert!(text.contains(&line), "{text}");
}

const MIB: u64 = 1 << 20;

/// Replaces the log Nix kept of `drv` (compressed, where Nix 2.8 keeps it) with `packed`.
fn replace_log(drv: &str, packed: &[u8]) {
    let base = base_name(drv);
    let file = Path::new("/nix/var/log/nix/drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]));
    assert!(
        file.is_file(),
        "Nix kept no log of {drv} at {}",
        file.display()
    );
    std::fs::write(&file, packed).unwrap();
}

/// `push --upload-logs --memory BUDGET --json` of `outs` under GNU time: its summary and
/// peak RSS.
fn push_logs_measured(url: &str, budget: u64, outs: &[String]) -> (serde_json::Value, u64) {
    let mut args: Vec<String> = ["--unsigned", "--json", "--upload-logs"]
        .map(str::to_owned)
        .to_vec();
    args.extend_from_slice(outs);
    let (rss, stdout) = peak_rss_of_push_with(url, budget, &args);
    (serde_json::from_slice(&stdout).unwrap(), rss)
}

#[test]
fn a_log_of_200_mib_goes_up_whole_within_the_memory_budget() {
    let (out, drv, _) = build_with_log("log-large-file");
    let (text, packed) = narflow::logs::large_test_log(200);
    assert!(text.len() as u64 > 200 * MIB && packed.len() < text.len() / 8);
    replace_log(&drv, &packed);
    let cache = tempdir();
    // Near the smallest budget (one chunk and one compression output beside the cache's
    // half): the push of one small path needs some 25 MiB, so a log held whole, or even
    // 64 MiB of it, would go past the bound.
    let budget = 20 * MIB;
    let (summary, rss) = push_logs_measured(&file_url(cache.path()), budget, &[out]);
    assert_eq!(
        summary["logs"],
        serde_json::json!({"uploaded": 1, "missing": 0, "failed": 0}),
        "{summary}"
    );
    let got = std::fs::read(cache.path().join("log").join(base_name(&drv))).unwrap();
    assert_eq!(got.len(), text.len());
    assert!(got == text, "the log's bytes differ");
    assert_bounded("file:// with a 200 MiB log", budget, rss);
}

#[test]
fn on_s3_logs_larger_than_the_upload_memory_go_up_whole_within_the_memory_budget() {
    let Some(env) = s3_env() else { return };
    // As many logs as go up at once (`logs::LOG_THREADS`), each larger than the 32 MiB of
    // upload memory S3 gets from the budget below.
    let built: Vec<(String, String, String)> = (0..narflow::logs::LOG_THREADS)
        .map(|i| build_with_log(&format!("log-large-s3-{i}")))
        .collect();
    let (text, packed) = narflow::logs::large_test_log(72);
    for (_, drv, _) in &built {
        replace_log(drv, &packed);
    }
    let outs: Vec<String> = built.iter().map(|(out, _, _)| out.clone()).collect();
    // The smallest budget S3 takes (8 MiB parts in a quarter of its half).
    let budget = 64 * MIB;
    let (summary, rss) = push_logs_measured(&env.url(""), budget, &outs);
    assert_eq!(
        summary["logs"],
        serde_json::json!({"uploaded": built.len(), "missing": 0, "failed": 0}),
        "{summary}"
    );
    let client = env.client();
    for (_, drv, _) in &built {
        let key = format!("log/{}", base_name(drv));
        let head = client.head(&key).expect("the log object");
        assert_eq!(
            head.content_type.as_deref(),
            Some("text/plain; charset=utf-8")
        );
        let got = client.get(&key).unwrap();
        client.delete(&key);
        assert_eq!(got.len(), text.len(), "{key}");
        assert!(got == text, "{key}: the log's bytes differ");
    }
    assert_bounded("S3 with 4 logs of 72 MiB", budget, rss);
}
