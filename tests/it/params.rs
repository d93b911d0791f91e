//! What `narflow push` makes of its key files and of the store-URL parameters beyond
//! compression: run through the binary against real Nix store paths.
use crate::helpers::*;
use std::path::Path;
use std::process::Output;

fn file_url(dir: &Path, query: &str) -> String {
    format!("file://{}{query}", dir.display())
}

/// `narflow push --to URL ARGS... PATH`.
fn push(url: &str, args: &[&str], path: &str) -> Output {
    narflow()
        .args(["push", "--to", url])
        .args(args)
        .arg(path)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A new store path holding one small file.
fn small_store_path(tag: &str) -> String {
    let dir = tempdir();
    let file = dir.path().join("f");
    std::fs::write(&file, unique(tag)).unwrap();
    nix_store_add(&file)
}

#[test]
fn key_file_open_to_group_or_others_is_refused_unless_allowed() {
    let path = small_store_path("params-key-mode");
    let key = nix_generate_key("narflow-params-1");
    let secret = key.secret.to_str().unwrap();
    let narinfo = narinfo_key(&path);

    // Refused, as --key-file and as the URL's secret-key=, for read and for write access.
    for (mode, via_url) in [
        (0o644, false),
        (0o640, true),
        (0o604, false),
        (0o620, false),
    ] {
        set_mode(&key.secret, mode);
        let cache = tempdir();
        let out = if via_url {
            let url = file_url(cache.path(), &format!("?secret-key={secret}"));
            push(&url, &[], &path)
        } else {
            push(&file_url(cache.path(), ""), &["--key-file", secret], &path)
        };
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "mode {mode:o}: {err}");
        for needle in [
            format!("key file {secret} has mode {mode:04o}"),
            format!("chmod 600 {secret}"),
            "--allow-insecure-key-file".to_owned(),
        ] {
            assert!(
                err.contains(&needle),
                "mode {mode:o}: {needle:?} not in {err}"
            );
        }
        assert!(!cache.path().join(&narinfo).exists(), "mode {mode:o}");
    }

    // A key only its owner can read is used.
    for mode in [0o600, 0o400] {
        set_mode(&key.secret, mode);
        let cache = tempdir();
        let out = push(&file_url(cache.path(), ""), &["--key-file", secret], &path);
        assert!(out.status.success(), "mode {mode:o}: {}", stderr(&out));
        let text = std::fs::read_to_string(cache.path().join(&narinfo)).unwrap();
        assert!(text.contains("Sig: narflow-params-1:"), "{text}");
    }

    // The flag (or its environment variable) overrides the check.
    set_mode(&key.secret, 0o644);
    let cache = tempdir();
    let out = push(
        &file_url(cache.path(), ""),
        &["--key-file", secret, "--allow-insecure-key-file"],
        &path,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(cache.path().join(&narinfo).exists());
    let cache = tempdir();
    let out = narflow()
        .args([
            "push",
            "--to",
            &file_url(cache.path(), ""),
            "--key-file",
            secret,
        ])
        .arg(&path)
        .env("NARFLOW_ALLOW_INSECURE_KEY_FILE", "true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(cache.path().join(&narinfo).exists());
}
