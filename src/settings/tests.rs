use super::*;
use crate::format::compression::Compression;
use crate::handoff::config::DEFAULT_CONFIG;
use crate::pipeline::PushOptions;
use clap::{Args, FromArgMatches};
use std::time::Duration;

/// The flag layer as `narflow` parses it from `args` and `env` (`NARFLOW_*` variables),
/// merged over a file with `file_text`.
fn merged(args: &[&str], env: &[(&str, &str)], file_text: Option<&str>) -> Merged {
    let mut cmd = Settings::augment_args(clap::Command::new("t").no_binary_name(true));
    cmd.build();
    // clap reads variables from the process environment, which tests running in
    // parallel must not change: a variable is given as the flag clap would read it as
    // (unless the flag itself is given: it wins), and its source is the variable's.
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut from_env = Vec::new();
    for (var, value) in env {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == *var))
            .unwrap_or_else(|| panic!("no argument reads {var}"));
        let flag = format!("--{}", arg.get_long().unwrap());
        if !args
            .iter()
            .any(|a| a.split('=').next() == Some(flag.as_str()))
        {
            from_env.push((arg.get_id().to_string(), var.to_string()));
            argv.push(format!("{flag}={value}"));
        }
    }
    let matches = cmd.clone().try_get_matches_from(&argv).unwrap();
    let flags = Settings::from_arg_matches(&matches).unwrap();
    let file =
        file_text.map(|t| ConfigFile::parse(Path::new("/etc/narflow/narflow.toml"), t).unwrap());
    Merged::new(
        flags,
        |id| match from_env.iter().find(|(i, _)| i == id) {
            Some((_, var)) => Some(Source::Env(var.clone())),
            None => clap_source(&matches, id, &cmd),
        },
        None,
        file,
    )
}

fn source(m: &Merged, key: &str) -> String {
    m.resolve().unwrap().source(key).to_string()
}

#[test]
fn flags_win_over_env_which_wins_over_the_file_which_wins_over_defaults() {
    let file = "to = \"file:///c\"\n\n# the budget\nmemory = \"128M\"\njobs = 3\n";
    let m = merged(
        &["--memory", "512M"],
        &[("NARFLOW_MEMORY", "256M")],
        Some(file),
    );
    assert_eq!(m.resolve().unwrap().memory, 512 << 20);
    assert_eq!(source(&m, "memory"), "flag:--memory");

    let m = merged(&[], &[("NARFLOW_MEMORY", "256M")], Some(file));
    assert_eq!(m.resolve().unwrap().memory, 256 << 20);
    assert_eq!(source(&m, "memory"), "env:NARFLOW_MEMORY");

    let m = merged(&[], &[], Some(file));
    let r = m.resolve().unwrap();
    assert_eq!((r.memory, r.jobs), (128 << 20, 3));
    assert_eq!(source(&m, "memory"), "file:/etc/narflow/narflow.toml:4");
    assert_eq!(source(&m, "jobs"), "file:/etc/narflow/narflow.toml:5");

    let m = merged(&[], &[], None);
    assert_eq!(m.resolve().unwrap().memory, crate::memory::DEFAULT_MEMORY);
    assert_eq!(source(&m, "memory"), "default");
}

#[test]
fn tables_merge_key_by_key() {
    let file = "[daemon]\nsocket-group = \"nixbld\"\nshutdown-timeout = 5\n[s3]\nretries = 2\n";
    let m = merged(&["--shutdown-timeout", "7.5"], &[], Some(file));
    let r = m.resolve().unwrap();
    assert_eq!(r.socket_group.as_deref(), Some("nixbld"));
    assert_eq!(r.shutdown_timeout, Duration::from_millis(7500));
    assert_eq!(r.s3.retries, 2);
    assert_eq!(
        source(&m, "daemon.socket-group"),
        "file:/etc/narflow/narflow.toml:2"
    );
    assert_eq!(
        source(&m, "daemon.shutdown-timeout"),
        "flag:--shutdown-timeout"
    );
    assert_eq!(source(&m, "s3.retries"), "file:/etc/narflow/narflow.toml:5");
}

#[test]
fn url_parameters_fill_in_what_no_layer_gives() {
    let url = "s3://b?compression=xz&compression-level=9&concurrency=4&retries=1&read-timeout=7";
    let m = merged(&["--to", url], &[], None);
    let r = m.resolve().unwrap();
    assert_eq!(
        (r.compression.kind, r.compression.level),
        (Compression::Xz, 9)
    );
    assert_eq!((r.s3.concurrency, r.s3.retries), (4, 1));
    assert_eq!(r.s3.read_timeout, Duration::from_secs(7));
    for (key, src) in [
        ("compression", "url:compression="),
        ("level", "url:compression-level="),
        ("s3.concurrency", "url:concurrency="),
        ("s3.retries", "url:retries="),
        ("s3.read-timeout", "url:read-timeout="),
        ("s3.connect-timeout", "default"),
    ] {
        assert_eq!(source(&m, key), src, "{key}");
    }

    // A layer that gives the value wins over the URL.
    let m = merged(
        &["--to", url, "--level", "2", "--s3-concurrency", "9"],
        &[],
        Some("compression = \"zstd\"\n[s3]\nread-timeout = 3\n"),
    );
    let r = m.resolve().unwrap();
    assert_eq!(
        (r.compression.kind, r.compression.level),
        (Compression::Zstd, 2)
    );
    assert_eq!(r.s3.concurrency, 9);
    assert_eq!(r.s3.retries, 1);
    assert_eq!(r.s3.read_timeout, Duration::from_secs(3));
    assert_eq!(
        source(&m, "compression"),
        "file:/etc/narflow/narflow.toml:1"
    );
    assert_eq!(source(&m, "level"), "flag:--level");
    assert_eq!(
        source(&m, "s3.read-timeout"),
        "file:/etc/narflow/narflow.toml:3"
    );
}

#[test]
fn the_urls_secret_key_adds_to_the_key_files() {
    let m = merged(
        &[
            "--to",
            "file:///c?secret-key=/k/url",
            "--key-file",
            "/k/a,/k/b",
        ],
        &[],
        None,
    );
    let r = m.resolve().unwrap();
    assert_eq!(
        r.key_files,
        [PathBuf::from("/k/a"), "/k/b".into(), "/k/url".into()]
    );
    let m = merged(
        &["--to", "file:///c?secret-key=/k/url"],
        &[],
        Some("key-file = [\"/k/f\"]"),
    );
    assert_eq!(
        m.resolve().unwrap().key_files,
        [PathBuf::from("/k/f"), "/k/url".into()]
    );
    let m = merged(&["--to", "file:///c?secret-key=/k/url"], &[], None);
    assert_eq!(source(&m, "key-file"), "url:secret-key=");
    let entry = |m: &Merged| {
        let r = m.resolve().unwrap();
        r.entries()
            .into_iter()
            .find(|e| e.key == "key-file")
            .unwrap()
            .source
    };
    assert_eq!(entry(&m), "url:secret-key=");
    let m = merged(
        &["--to", "file:///c?secret-key=/k/url", "--key-file", "/k/a"],
        &[],
        None,
    );
    assert_eq!(entry(&m), "flag:--key-file + url:secret-key=");
}

#[test]
fn boolean_flags_and_their_variables() {
    let m = merged(
        &["--unsigned"],
        &[("NARFLOW_ALLOW_INSECURE_KEY_FILE", "true")],
        None,
    );
    let r = m.resolve().unwrap();
    assert!(r.unsigned && r.allow_insecure_key_file);
    let m = merged(&["--unsigned=false"], &[], Some("unsigned = true"));
    assert!(!m.resolve().unwrap().unsigned);
    let m = merged(&[], &[], Some("unsigned = true"));
    assert!(m.resolve().unwrap().unsigned);
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let path = Path::new("/x/narflow.toml");
    for (text, key, line, known) in [
        (
            "to = \"file:///c\"\n\nmemroy = \"1G\"\n",
            "memroy",
            3,
            "memory",
        ),
        (
            "[daemon]\nsocket-group = \"a\"\nsocket_group = \"b\"\n",
            "daemon.socket_group",
            3,
            "socket-group",
        ),
        (
            "[s3]\n\n\n\npart_size = 1\n",
            "s3.part_size",
            5,
            "part-size",
        ),
        ("daemon.frob = 1\n", "daemon.frob", 1, "metrics-listen"),
        ("[push]\njobs = 1\n", "push", 1, "[daemon]"),
    ] {
        let e = ConfigFile::parse(path, text).unwrap_err();
        let SettingsError::UnknownKey {
            key: k, line: l, ..
        } = &e
        else {
            panic!("{text:?}: {e}");
        };
        assert_eq!((k.as_str(), *l), (key, line), "{text:?}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("/x/narflow.toml:{line}: unknown key `{key}`")),
            "{msg}"
        );
        assert!(msg.contains(known), "{msg}");
    }
}

#[test]
fn a_bad_value_names_the_key_its_line_and_what_is_wrong() {
    let path = Path::new("/x/narflow.toml");
    for (text, key, line, what) in [
        (
            "to = \"file:///c\"\nmemory = \"12Q\"\n",
            "memory",
            2,
            "\"12Q\" is not a size",
        ),
        ("jobs = \"many\"\n", "jobs", 1, "expected usize"),
        (
            "\n[daemon]\nshutdown-timeout = -1\n",
            "daemon.shutdown-timeout",
            3,
            "-1 is not a number of seconds",
        ),
        (
            "[daemon]\nmetrics-listen = \"localhost\"\n",
            "daemon.metrics-listen",
            2,
            "invalid socket address",
        ),
        ("compression = \"gzip\"\n", "compression", 1, "gzip"),
        ("key-file = \"/k\"\n", "key-file", 1, "expected a sequence"),
        ("[s3]\npart-size = -5\n", "s3.part-size", 2, "negative"),
        ("daemon = 3\n", "daemon", 1, "expected a table"),
    ] {
        let e = ConfigFile::parse(path, text).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("/x/narflow.toml:{line}: {key}: ")) && msg.contains(what),
            "{text:?}: {msg}"
        );
    }
    let e = ConfigFile::parse(path, "to = \n").unwrap_err().to_string();
    assert!(e.starts_with("/x/narflow.toml:1: "), "{e}");
}

#[test]
fn values_that_parse_but_cannot_be_used_name_the_key_and_source() {
    let m = merged(&["--memory", "1K"], &[], None);
    let e = m.resolve().unwrap_err().to_string();
    assert!(
        e.starts_with(
            "memory (from flag:--memory): 1.0 KiB is too small: at least 17M is needed (to \
             read and compress one 4.0 MiB chunk (chunk-size) at a time); raise --memory"
        ),
        "{e}"
    );
    let m = merged(&[], &[], Some("\n[s3]\npart-size = \"1M\"\n"));
    let e = m.resolve().unwrap_err().to_string();
    assert!(
        e.starts_with("s3.part-size (from file:/etc/narflow/narflow.toml:3): part size"),
        "{e}"
    );
    let m = merged(&["--to", "file:///c?compression-level=99"], &[], None);
    let e = m.resolve().unwrap_err().to_string();
    assert!(
        e.starts_with("level (from url:compression-level=): compression level 99"),
        "{e}"
    );
    let m = merged(&[], &[], Some("\n\nto = \"http://cache\"\n"));
    let e = m.resolve().unwrap_err().to_string();
    assert!(
        e.starts_with("to (from file:/etc/narflow/narflow.toml:3): cache URL \"http://cache\": unsupported scheme"),
        "{e}"
    );
    let m = merged(&["--s3-concurrency", "0"], &[], None);
    let e = m.resolve().unwrap_err().to_string();
    assert!(
        e.starts_with("s3.concurrency (from flag:--s3-concurrency)"),
        "{e}"
    );
}

#[test]
fn every_setting_has_one_file_key_and_every_file_key_is_read() {
    let cmd = Settings::augment_args(clap::Command::new("t"));
    let ids: Vec<&str> = cmd.get_arguments().map(|a| a.get_id().as_str()).collect();
    for key in KEYS.iter() {
        assert!(
            ids.contains(&key.id),
            "{}: no argument {}",
            key.name,
            key.id
        );
    }
    for id in &ids {
        assert_eq!(
            KEYS.iter().filter(|k| k.id == *id).count(),
            1,
            "argument {id}"
        );
    }
    // A file that sets every key, each on its own line, is read whole.
    let file = "to = \"file:///c\"\nkey-file = [\"/k\"]\ncompression = \"xz\"\nlevel = 2\njobs = 1\n\
        memory = \"1G\"\nchunk-size = 1048576\nunsigned = true\nallow-insecure-key-file = false\n\
        trusted-key = [\"k-1:AAAA\"]\nsocket = \"/s\"\nstate-dir = \"/d\"\nmax-rate = \"50M\"\nupload-logs = true\nupload-journal = \"off\"\nresume-max-age = \"3d\"\n[daemon]\n\
        socket-group = 30000\nshutdown-timeout = 1.5\nmetrics-listen = \"127.0.0.1:9464\"\n\
        watch-store = \"all\"\n[s3]\nconcurrency = 3\nretries = 4\n\
        connect-timeout = 2\nread-timeout = 9\npart-size = \"16M\"\n[hook]\ntimeout = 0.5\n\
        [gc]\ngrace = \"1d\"\nsettle = 30\nbatch-size = 500\n";
    let f = ConfigFile::parse(Path::new("/f"), file).unwrap();
    for key in KEYS.iter() {
        assert!(f.line(key.name).is_some(), "{} not read", key.name);
    }
    let r = Merged::new(Settings::default(), |_| None, None, Some(f))
        .resolve()
        .unwrap();
    assert_eq!(r.memory, 1 << 30);
    assert_eq!(r.chunk_size, 1 << 20);
    assert_eq!(r.socket_group.as_deref(), Some("30000"));
    assert_eq!(r.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(r.max_rate, Some(50 << 20));
    assert!(r.upload_logs);
    assert_eq!(r.watch_store, Some(crate::settings::WatchStore::All));
    assert_eq!(r.s3.min_part_size, 16 << 20);
    assert_eq!(r.hook_timeout, Duration::from_millis(500));
    assert_eq!(r.gc_grace, Duration::from_secs(86400));
    assert_eq!(r.gc_settle, Duration::from_secs(30));
    assert_eq!(r.gc_batch_size, 500);
    assert_eq!(r.entries().len(), KEYS.len());
    assert!(r.entries().iter().all(|e| e.source.starts_with("file:/f:")));
}

#[test]
fn sizes_are_powers_of_1024() {
    assert_eq!(parse_size("64M"), Ok(64 << 20));
    assert_eq!(parse_size("64MB"), Ok(64 << 20));
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("2k"), Ok(2048));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert!(
        parse_size("12X")
            .unwrap_err()
            .contains("\"12X\" is not a size")
    );
    assert!(parse_size("M").is_err());
    assert!(parse_size("-1").is_err());
    assert_eq!(format_size(64 << 20), "64.0 MiB");
    assert_eq!(format_size(512), "512 B");
}

#[test]
fn userinfo_in_a_url_is_not_shown() {
    assert_eq!(
        redact_userinfo("s3://user:secret@bucket?x=1"),
        "s3://***@bucket?x=1"
    );
    assert_eq!(
        redact_userinfo("s3://bucket?endpoint=a@b"),
        "s3://bucket?endpoint=a@b"
    );
    assert_eq!(redact_userinfo("file:///x"), "file:///x");
}

#[test]
fn a_missing_default_file_is_fine_and_a_missing_named_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("narflow.toml");
    assert!(ConfigFile::load(&missing, false).unwrap().is_none());
    let e = ConfigFile::load(&missing, true).unwrap_err().to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    let named = ConfigChoice::new(Some(missing.clone()), true);
    assert_eq!(named.source, Source::Env("NARFLOW_CONFIG".into()));
    assert!(named.load().is_err());
    assert_eq!(
        ConfigChoice::new(None, false).path,
        Path::new(DEFAULT_CONFIG)
    );
}

#[test]
fn the_example_file_names_every_key_with_its_default() {
    let text = include_str!("../../contrib/narflow.toml");
    // Each key's first `# key = value` line is its default; later ones are examples.
    let mut seen = Vec::new();
    let mut table = String::new();
    let mut uncommented = String::new();
    for line in text.lines() {
        let body = line.strip_prefix("# ").unwrap_or(line);
        if let Some(t) = line.strip_prefix('[') {
            table = t.trim_end_matches(']').to_owned();
            uncommented.push_str(line);
        } else if let Some((k, _)) = body.split_once(" = ") {
            let key = if table.is_empty() {
                k.to_owned()
            } else {
                format!("{table}.{k}")
            };
            if !seen.contains(&key) {
                seen.push(key);
                uncommented.push_str(body);
            }
        }
        uncommented.push('\n');
    }
    for key in KEYS.iter() {
        assert!(
            seen.iter().any(|k| k == key.name),
            "{} is not in contrib/narflow.toml",
            key.name
        );
    }
    let file = ConfigFile::parse(Path::new("narflow.toml"), &uncommented).unwrap();
    let example = Merged::new(Settings::default(), |_| None, None, Some(file));
    let defaults = Merged::new(Settings::default(), |_| None, None, None);
    let (example, defaults) = (example.resolve().unwrap(), defaults.resolve().unwrap());
    // Keys with no default (or one that depends on the machine) show an example.
    let no_default = [
        "to",
        "jobs",
        "max-rate",
        "upload-journal",
        "daemon.socket-group",
        "daemon.metrics-listen",
        "daemon.watch-store",
    ];
    for (e, d) in example.entries().iter().zip(defaults.entries()) {
        if !no_default.contains(&e.key) {
            assert_eq!(
                e.value, d.value,
                "{}: the example's value is not the default",
                e.key
            );
        }
    }
    assert_eq!(
        example.metrics_listen,
        Some("127.0.0.1:9464".parse().unwrap())
    );
}

#[test]
fn a_budget_too_small_for_the_cache_names_the_least_that_works() {
    // S3 takes any budget the pipeline takes: its parts shrink to what the memory holds.
    let m = merged(&["--to", "s3://b", "--memory", "17M"], &[], None);
    assert_eq!(m.resolve().unwrap().memory, 17 << 20);
    // Below one part of S3's smallest (with chunks small enough for the pipeline).
    let m = merged(
        &["--to", "s3://b", "--memory", "8M", "--chunk-size", "1M"],
        &[],
        None,
    );
    let e = m.resolve().unwrap_err().to_string();
    assert_eq!(
        e,
        "memory (from flag:--memory): 8.0 MiB is too small: at least 10M is needed (to fill \
         one S3 part of 5.0 MiB, the smallest S3 takes); raise --memory"
    );
    // The same budget is enough for a directory, which buffers nothing.
    let m = merged(
        &["--to", "file:///c", "--memory", "8M", "--chunk-size", "1M"],
        &[],
        None,
    );
    assert_eq!(m.resolve().unwrap().memory, 8 << 20);
    // A part size given is kept: the budget must hold it.
    let m = merged(
        &["--to", "s3://b"],
        &[],
        Some("[s3]\npart-size = \"64M\"\n"),
    );
    let e = m.resolve().unwrap_err().to_string();
    assert_eq!(
        e,
        "s3.part-size (from file:/etc/narflow/narflow.toml:2): parts of 64.0 MiB need \
         --memory 512M or more; raise --memory or lower s3.part-size"
    );
    let m = merged(
        &["--to", "s3://b", "--memory", "512M"],
        &[],
        Some("[s3]\npart-size = \"64M\"\n"),
    );
    assert_eq!(m.resolve().unwrap().s3.min_part_size, 64 << 20);
}

#[test]
fn each_declared_default_is_the_value_a_run_uses() {
    let none = merged(&[], &[], None).resolve().unwrap();
    let flags: Vec<String> = KEYS
        .iter()
        .filter_map(|k| k.default.value().map(|v| format!("--{}={v}", k.flag)))
        .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let given = merged(&flags, &[], None).resolve().unwrap();
    for (d, g) in none.entries().iter().zip(given.entries()) {
        assert_eq!(d.value, g.value, "{}", d.key);
    }
    // And they are the library's own defaults, for what is used without settings.
    let o = PushOptions::new(none.compression, Vec::new());
    assert_eq!(
        (o.memory, o.chunk_size, o.jobs),
        (none.memory, none.chunk_size, none.jobs)
    );
    assert_eq!(none.s3, crate::cache::S3Tuning::default());
    assert_eq!(none.socket, Path::new(crate::handoff::hook::DEFAULT_SOCKET));
    assert_eq!(
        none.state_dir,
        Path::new(crate::handoff::hook::DEFAULT_STATE_DIR)
    );
    assert_eq!(none.hook_timeout, crate::handoff::hook::DEFAULT_TIMEOUT);
}

#[test]
fn the_list_says_each_settings_name_variable_flag_default_and_help() {
    let cmd = Settings::augment_args(clap::Command::new("t"));
    let mut envs = Vec::new();
    for key in KEYS.iter() {
        assert!(
            key.env.starts_with("NARFLOW_") && !envs.contains(&key.env),
            "{key:?}"
        );
        envs.push(key.env);
        assert!(!key.help.is_empty() && !key.help.contains('\n'), "{key:?}");
        let arg = cmd.get_arguments().find(|a| a.get_id() == key.id).unwrap();
        assert_eq!(arg.get_long(), Some(key.flag));
        assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(key.env));
        assert_eq!(arg.is_hide_set(), key.hidden, "{}", key.name);
        let help = arg.get_help().unwrap().to_string();
        assert_eq!(help, format!("{} [default: {}]", key.help, key.default));
    }
    let sizes: Vec<&str> = KEYS
        .iter()
        .filter(|k| k.is_size())
        .map(|k| k.name)
        .collect();
    assert_eq!(sizes, ["max-rate", "memory", "chunk-size", "s3.part-size"]);
}

#[test]
fn gc_durations_take_units_or_seconds_from_every_layer() {
    let d = |s: &str| s.parse::<Span>().map(|s| s.0);
    assert_eq!(d("24h"), Ok(Duration::from_secs(24 * 3600)));
    assert_eq!(d("30m"), Ok(Duration::from_secs(1800)));
    assert_eq!(d("7d"), Ok(Duration::from_secs(7 * 86400)));
    assert_eq!(d("1h 30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(d("0"), Ok(Duration::ZERO));
    assert_eq!(d("2.5"), Ok(Duration::from_millis(2500)));
    assert!(
        d("soon")
            .unwrap_err()
            .contains("\"soon\" is not a duration")
    );
    assert!(d("-1h").is_err());

    let r = merged(&[], &[], None).resolve().unwrap();
    assert_eq!(r.gc_grace, Duration::from_secs(86400));
    assert_eq!(r.gc_settle, Duration::from_secs(120));
    assert_eq!(r.gc_batch_size, 1000);
    let m = merged(
        &["--grace=0"],
        &[("NARFLOW_GC_SETTLE", "1s")],
        Some("[gc]\ngrace = \"2h\"\nbatch-size = 2\n"),
    );
    let r = m.resolve().unwrap();
    assert_eq!(
        (r.gc_grace, r.gc_settle, r.gc_batch_size),
        (Duration::ZERO, Duration::from_secs(1), 2)
    );
    assert_eq!(source(&m, "gc.grace"), "flag:--grace");
    assert_eq!(source(&m, "gc.settle"), "env:NARFLOW_GC_SETTLE");
    let e = merged(&["--gc-batch-size=1001"], &[], None)
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("gc.batch-size (from flag:--gc-batch-size)"),
        "{e}"
    );
}

#[test]
fn the_upload_journal_is_a_file_off_or_the_commands_default_place() {
    use crate::settings::JournalFile;
    let r = merged(&[], &[], None).resolve().unwrap();
    assert_eq!(r.upload_journal, None);
    assert_eq!(r.resume_max_age, Duration::from_secs(7 * 86400));
    assert_eq!(
        r.backfill_journal(Path::new("/var/lib/narflow/backfill-x.json")),
        Some(PathBuf::from("/var/lib/narflow/uploads.sqlite"))
    );
    let r = merged(&["--upload-journal=off", "--resume-max-age=12h"], &[], None)
        .resolve()
        .unwrap();
    assert_eq!(r.upload_journal, Some(JournalFile::Off));
    assert_eq!(r.push_journal(), None);
    assert_eq!(r.backfill_journal(Path::new("/s/state.json")), None);
    assert_eq!(r.resume_max_age, Duration::from_secs(12 * 3600));
    let m = merged(
        &[],
        &[],
        Some("upload-journal = \"/j/uploads.sqlite\"\nresume-max-age = \"2d\"\n"),
    );
    let r = m.resolve().unwrap();
    assert_eq!(r.push_journal(), Some(PathBuf::from("/j/uploads.sqlite")));
    assert_eq!(
        r.backfill_journal(Path::new("/s/state.json")),
        Some(PathBuf::from("/j/uploads.sqlite"))
    );
    assert_eq!(r.resume_max_age, Duration::from_secs(2 * 86400));
}

#[test]
fn every_setting_has_a_kind_the_manual_can_name() {
    for key in KEYS.iter() {
        assert_ne!(
            key.kind(),
            "other",
            "{}: add its type to Key::kind",
            key.name
        );
    }
}

#[test]
fn the_configuration_reference_is_written_from_the_settings_list() {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join(REFERENCE_PAGE);
    let written = reference_markdown();
    if std::env::var_os("NARFLOW_UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&page, &written).unwrap();
    }
    let committed = std::fs::read_to_string(&page).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; write it with: {REGENERATE}",
            page.display()
        )
    });
    assert!(
        committed == written,
        "{REFERENCE_PAGE} is not what the settings list in src/settings/table.rs writes; \
         write it again with: {REGENERATE}"
    );
    // Every key is in it, with its variable.
    for key in KEYS.iter() {
        assert!(
            written.contains(&format!("\n## `{}`\n", key.name)),
            "{}",
            key.name
        );
        assert!(
            written.contains(&format!("- variable: `{}`\n", key.env)),
            "{}",
            key.name
        );
    }
}
