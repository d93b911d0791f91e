//! Settings through the real binary: the config file, `NARFLOW_*` variables and flags in
//! their order, URL parameters under them, errors that name the key and line,
//! `narflow config --json`, and a daemon configured by its file alone.
use crate::helpers::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `narflow config --json` with `args`, and `vars` set (every other settings variable
/// removed, so the caller's environment does not leak in); the `settings` array by key.
fn config_json(args: &[&str], vars: &[(&str, &str)]) -> serde_json::Value {
    let out = isolated(narflow().args(["config", "--json"]).args(args), vars)
        .output()
        .unwrap();
    assert!(out.status.success(), "narflow config: {}", stderr_of(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("config --json");
    let mut by_key = serde_json::Map::new();
    for e in v["settings"].as_array().expect("settings array") {
        by_key.insert(e["key"].as_str().unwrap().to_owned(), e.clone());
    }
    serde_json::json!({ "config_file": v["config_file"], "settings": by_key })
}

/// Removes every `NARFLOW_*` settings variable from `cmd`, then sets `vars`.
fn isolated<'a>(cmd: &'a mut Command, vars: &[(&str, &str)]) -> &'a mut Command {
    for (k, _) in std::env::vars() {
        if k.starts_with("NARFLOW_") && !k.starts_with("NARFLOW_TEST") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn a_flag_wins_over_its_variable_which_wins_over_the_file() {
    let dir = tempdir();
    let file = write(
        &dir.path().join("narflow.toml"),
        "# narflow\nto = \"file:///var/cache/x\"\n\nmemory = \"128M\"\n[daemon]\nshutdown-timeout = 9\n",
    );
    let env = [("NARFLOW_MEMORY", "256M")];

    let v = config_json(&["--config", &file, "--memory", "512M"], &env);
    assert_eq!(v["settings"]["memory"]["value"], 512u64 << 20, "{v}");
    assert_eq!(v["settings"]["memory"]["source"], "flag:--memory");

    let v = config_json(&["--config", &file], &env);
    assert_eq!(v["settings"]["memory"]["value"], 256u64 << 20, "{v}");
    assert_eq!(v["settings"]["memory"]["source"], "env:NARFLOW_MEMORY");

    let v = config_json(&["--config", &file], &[]);
    assert_eq!(v["settings"]["memory"]["value"], 128u64 << 20, "{v}");
    assert_eq!(v["settings"]["memory"]["source"], format!("file:{file}:4"));
    assert_eq!(v["settings"]["to"]["source"], format!("file:{file}:2"));
    assert_eq!(
        v["settings"]["daemon.shutdown-timeout"]["source"],
        format!("file:{file}:6")
    );
    assert_eq!(v["settings"]["jobs"]["source"], "default");
    assert_eq!(
        v["config_file"],
        serde_json::json!({"path": file, "source": "flag:--config", "read": true})
    );

    // The file named by NARFLOW_CONFIG instead of --config.
    let v = config_json(&[], &[("NARFLOW_CONFIG", &file)]);
    assert_eq!(v["config_file"]["source"], "env:NARFLOW_CONFIG");
    assert_eq!(v["settings"]["memory"]["source"], format!("file:{file}:4"));

    // The human form says the same, one key a line.
    let out = isolated(narflow().args(["config", "--config", &file]), &[])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("memory = 134217728  # file:{file}:4 (128.0 MiB)")),
        "{text}"
    );
}

#[test]
fn a_flag_wins_over_the_urls_parameter_and_the_upload_follows_it() {
    let path = nix_store_add(&{
        let dir = tempdir();
        let f = dir.path().join(unique("config-url"));
        std::fs::write(&f, unique("contents")).unwrap();
        std::mem::forget(dir);
        f
    });
    let cache = tempdir();
    let url = format!("file://{}?compression=xz", cache.path().display());

    let v = config_json(&["--to", &url], &[]);
    assert_eq!(v["settings"]["compression"]["value"], "xz");
    assert_eq!(v["settings"]["compression"]["source"], "url:compression=");
    let v = config_json(&["--to", &url, "--compression", "none"], &[]);
    assert_eq!(v["settings"]["compression"]["value"], "none");
    assert_eq!(v["settings"]["compression"]["source"], "flag:--compression");

    let out = isolated(
        narflow().args([
            "push",
            "--unsigned",
            "--to",
            &url,
            "--compression",
            "none",
            &path,
        ]),
        &[],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let narinfo = std::fs::read_to_string(cache.path().join(narinfo_key(&path))).unwrap();
    assert_eq!(
        narinfo_field(&narinfo, "Compression"),
        Some("none"),
        "{narinfo}"
    );
}

#[test]
fn an_unknown_key_or_a_bad_value_in_the_file_is_named_with_its_line() {
    let dir = tempdir();
    let cache = tempdir();
    for (text, needle) in [
        (
            "unsigned = true\n\n[daemon]\nsocket-grop = \"nixbld\"\n",
            ":4: unknown key `daemon.socket-grop`",
        ),
        (
            "unsigned = true\nmemory = \"lots\"\n",
            ":2: memory: \"lots\" is not a size",
        ),
    ] {
        let file = write(&dir.path().join("narflow.toml"), text);
        for cmd in ["config", "push"] {
            let out = isolated(
                narflow().args([cmd, "--config", &file]).args(
                    (cmd == "push")
                        .then_some([
                            "--to",
                            &format!("file://{}", cache.path().display()),
                            "/nix/store/00000000000000000000000000000000-x",
                        ])
                        .into_iter()
                        .flatten(),
                ),
                &[],
            )
            .output()
            .unwrap();
            let err = stderr_of(&out);
            assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
            assert!(err.contains(&format!("{file}{needle}")), "{cmd}: {err}");
        }
    }
    // A daemon's setting on push's or backfill's command line is refused by name.
    for cmd in ["push", "backfill"] {
        let out = isolated(
            narflow().args([
                cmd,
                "--unsigned",
                "--socket-group",
                "nixbld",
                "--to",
                &format!("file://{}", cache.path().display()),
                "/nix/store/00000000000000000000000000000000-x",
            ]),
            &[],
        )
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let want = format!("--socket-group is a setting of narflow daemon, not of {cmd}");
        assert!(
            stderr_of(&out).contains(&want),
            "{cmd}: {}",
            stderr_of(&out)
        );
    }
    // A named file that is missing is an error too.
    let missing = dir.path().join("missing.toml");
    let out = isolated(
        narflow().args(["config", "--config", missing.to_str().unwrap()]),
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains(missing.to_str().unwrap()));
    assert!(std::fs::read_dir(cache.path()).unwrap().next().is_none());
}

#[test]
fn a_daemon_started_with_only_its_config_file_uploads_where_the_file_says() {
    let dir = tempdir();
    let key = nix_generate_key("narflow-config-1");
    let cache = dir.path().join("cache");
    let state = dir.path().join("state");
    let socket = dir.path().join("daemon.sock");
    let file = write(
        &dir.path().join("narflow.toml"),
        &format!(
            "to = \"file://{}\"\nkey-file = [\"{}\"]\nsocket = \"{}\"\nstate-dir = \"{}\"\n\
             [daemon]\nshutdown-timeout = 5\n",
            cache.display(),
            key.secret.display(),
            socket.display(),
            state.display()
        ),
    );
    let log = dir.path().join("daemon.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut daemon = isolated(narflow().args(["daemon", "--config", &file]), &[])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        if let Some(status) = daemon.try_wait().unwrap() {
            panic!(
                "the daemon exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        state.join("queue.sqlite").exists(),
        "the queue is not in the file's state-dir"
    );

    let src = dir.path().join(unique("config-daemon"));
    std::fs::write(&src, unique("contents")).unwrap();
    let path = nix_store_add(&src);
    let out = narflow()
        .arg("hook")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .env("OUT_PATHS", &path)
        .env_remove("DRV_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let narinfo = cache.join(narinfo_key(&path));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !narinfo.exists() {
        assert!(
            Instant::now() < deadline,
            "{path} never reached the file's cache: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&narinfo).unwrap();
    assert!(text.contains("Sig: narflow-config-1:"), "{text}");
    // narflow status finds the daemon through the file's socket.
    let out = isolated(narflow().args(["status", "--json", "--config", &file]), &[])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["daemon"], true, "{status}");
    run(Command::new("kill")
        .arg("-TERM")
        .arg(daemon.id().to_string()));
    assert!(daemon.wait().unwrap().success());
}

#[test]
fn a_budget_too_small_is_refused_at_start_by_every_command() {
    let dir = tempdir();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let url = format!("file://{}", cache.display());
    let (socket, state) = (dir.path().join("daemon.sock"), dir.path().join("state"));
    let (socket, state) = (socket.to_str().unwrap(), state.to_str().unwrap());
    let bench_dir = dir.path().join("bench");
    let path = "/nix/store/00000000000000000000000000000000-x";
    let common = ["--unsigned", "--to", &url, "--memory", "8M"];
    for args in [
        [&["push"][..], &common, &[path]].concat(),
        [&["backfill"][..], &common, &["--all"]].concat(),
        [
            &["daemon"][..],
            &common,
            &["--socket", socket, "--state-dir", state],
        ]
        .concat(),
        vec![
            "bench",
            "--memory",
            "8M",
            "--sink",
            "null",
            "--dir",
            bench_dir.to_str().unwrap(),
        ],
    ] {
        let child = isolated(narflow().args(&args), &[])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        // A command that started instead (a daemon would run on) fails the test.
        let Ok(out) = rx.recv_timeout(Duration::from_secs(60)) else {
            run(Command::new("kill").arg("-KILL").arg(pid.to_string()));
            panic!("{args:?} did not refuse its budget at start");
        };
        let out = out.unwrap();
        let err = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(
                "memory (from flag:--memory): 8.0 MiB is too small: at least 17M is needed"
            ),
            "{args:?}: {err}"
        );
        assert!(err.contains("raise --memory"), "{args:?}: {err}");
    }
    assert!(std::fs::read_dir(&cache).unwrap().next().is_none());
    assert!(!Path::new(state).exists() && !bench_dir.exists());
}

/// The daemon records unfinished uploads in its queue: an upload journal of its own is
/// refused at start by name (off is taken), and nothing is created.
#[test]
fn the_daemon_refuses_an_upload_journal_file_of_its_own() {
    let dir = tempdir();
    let (socket, state) = (dir.path().join("daemon.sock"), dir.path().join("state"));
    let out = isolated(
        narflow()
            .args([
                "daemon",
                "--unsigned",
                "--to",
                "s3://b?endpoint=http://127.0.0.1:9",
            ])
            .args(["--upload-journal", "/tmp/j.sqlite", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state),
        &[],
    )
    .stdin(Stdio::null())
    .output()
    .unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("upload-journal (from flag:--upload-journal): the daemon records"),
        "{err}"
    );
    assert!(!state.exists() && !socket.exists());
}
