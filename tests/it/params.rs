//! What `narflow push` makes of its key files and of the store-URL parameters beyond
//! compression: run through the binary against real Nix store paths.
use crate::helpers::*;
use std::path::Path;
use std::process::{Command, Output};

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

fn nix_copy(url: &str, paths: &[String]) {
    run(Command::new("nix").args(["copy", "--to", url]).args(paths));
}

/// Store paths covering each kind of NAR node: a directory tree (subdirectories, an empty
/// one, a symlink, an executable, an empty and a larger file, names that need JSON
/// escaping or are not UTF-8), a lone executable file and a lone symlink.
fn listing_store_paths(tag: &str) -> Vec<String> {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = tempdir();
    let root = dir.path().join(unique(tag));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("lib/empty-dir")).unwrap();
    std::fs::write(root.join("bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
    set_mode(&root.join("bin/tool"), 0o755);
    write_random_file(&root.join("lib/big"), 300_001, tag);
    std::fs::write(root.join("lib/empty"), "").unwrap();
    std::os::unix::fs::symlink("../bin/tool", root.join("lib/link")).unwrap();
    for name in [
        &b"q\"uote"[..],
        b"back\\slash",
        b"tab\tname",
        b"new\nline",
        b"ctl\x01\x1f",
        b"caf\xc3\xa9",
        b"not-utf8-\xff",
    ] {
        std::fs::write(root.join(OsStr::from_bytes(name)), name).unwrap();
    }
    let exe = dir.path().join(unique(&format!("{tag}-exe")));
    std::fs::write(&exe, "#!/bin/sh\n").unwrap();
    set_mode(&exe, 0o755);
    let link = dir.path().join(unique(&format!("{tag}-link")));
    std::os::unix::fs::symlink("/nix/store/target with \"quotes\"", &link).unwrap();
    [root, exe, link].iter().map(|p| nix_store_add(p)).collect()
}

fn listing_key(path: &str) -> String {
    format!("{}.ls", hash_part(path))
}

#[test]
fn nar_listing_is_byte_for_byte_what_nix_copy_writes() {
    let paths = listing_store_paths("params-listing");
    let theirs = tempdir();
    nix_copy(&file_url(theirs.path(), "?write-nar-listing=1"), &paths);
    let key = nix_generate_key("narflow-params-1");
    let ours = tempdir();
    let out = narflow()
        .args([
            "push",
            "--to",
            &file_url(ours.path(), "?write-nar-listing=1"),
        ])
        .arg("--key-file")
        .arg(&key.secret)
        .args(&paths)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for path in &paths {
        let ls = listing_key(path);
        let expected = std::fs::read(theirs.path().join(&ls)).unwrap();
        let got =
            std::fs::read(ours.path().join(&ls)).unwrap_or_else(|e| panic!("{path}: no {ls}: {e}"));
        assert!(
            got == expected,
            "{path}:\nnarflow: {}\nNix:     {}",
            got.escape_ascii(),
            expected.escape_ascii()
        );
    }

    // Without the parameter, no listing.
    let plain = tempdir();
    let out = push(
        &file_url(plain.path(), "?write-nar-listing=0"),
        &["--key-file", key.secret.to_str().unwrap()],
        &paths[1],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(plain.path().join(narinfo_key(&paths[1])).exists());
    assert!(!plain.path().join(listing_key(&paths[1])).exists());
}

#[test]
fn nar_listing_on_s3_is_application_json_with_nix_bytes() {
    let Some(env) = s3_env() else { return };
    let paths = listing_store_paths("params-listing-s3");
    let theirs = tempdir();
    nix_copy(&file_url(theirs.path(), "?write-nar-listing=1"), &paths);
    let key = nix_generate_key("narflow-params-1");
    let out = narflow()
        .args(["push", "--to", &env.url("&write-nar-listing=1")])
        .arg("--key-file")
        .arg(&key.secret)
        .args(&paths)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let c = env.client();
    for path in &paths {
        let ls = listing_key(path);
        let head = c.head(&ls).unwrap_or_else(|| panic!("{path}: no {ls}"));
        assert_eq!(head.content_type.as_deref(), Some("application/json"));
        assert_eq!(head.content_encoding, None);
        let expected = std::fs::read(theirs.path().join(&ls)).unwrap();
        assert!(
            c.get(&ls).unwrap() == expected,
            "{path}: the listing differs from Nix's"
        );
    }
}

#[test]
fn priority_and_want_mass_query_go_into_nix_cache_info() {
    let key = nix_generate_key("narflow-params-1");
    let secret = key.secret.to_str().unwrap();
    let cache = tempdir();
    let info = |dir: &Path| std::fs::read_to_string(dir.join("nix-cache-info")).unwrap();
    let push_ok = |query: &str, dir: &Path| {
        let path = small_store_path("params-cache-info");
        let out = push(&file_url(dir, query), &["--key-file", secret], &path);
        assert!(out.status.success(), "{query}: {}", stderr(&out));
    };

    // A new cache gets the URL's values.
    push_ok("?priority=10&want-mass-query=false", cache.path());
    assert_eq!(
        info(cache.path()),
        "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 10\n"
    );
    // A URL without them leaves the file as it is.
    push_ok("", cache.path());
    assert_eq!(
        info(cache.path()),
        "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 10\n"
    );
    // A URL asking for another value rewrites that value only.
    push_ok("?priority=30", cache.path());
    assert_eq!(
        info(cache.path()),
        "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 30\n"
    );

    // A cache Nix made (StoreDir only) gets the keys the URL asks for, and Nix reads the
    // file back.
    let nix_made = tempdir();
    nix_copy(
        &file_url(nix_made.path(), ""),
        &[small_store_path("params-cache-info-nix")],
    );
    assert_eq!(info(nix_made.path()), "StoreDir: /nix/store\n");
    push_ok("?want-mass-query=1", nix_made.path());
    assert_eq!(
        info(nix_made.path()),
        "StoreDir: /nix/store\nWantMassQuery: 1\n"
    );
    nix_copy(
        &file_url(nix_made.path(), ""),
        &[small_store_path("params-cache-info-nix")],
    );
}

#[test]
fn nix_parameters_narflow_does_not_implement_are_refused_by_name() {
    let path = small_store_path("params-refused");
    for (param, why) in [
        (
            "parallel-compression=true",
            "narflow always compresses in parallel",
        ),
        (
            "multipart-upload=true",
            "narflow always sends a NAR larger than one part",
        ),
        (
            "buffer-size=5242880",
            "narflow sizes multipart upload parts itself",
        ),
    ] {
        let name = param.split('=').next().unwrap();
        let cache = tempdir();
        for url in [
            file_url(cache.path(), &format!("?{param}")),
            format!("s3://some-bucket?region=x&{param}"),
        ] {
            let out = push(&url, &["--unsigned"], &path);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{url}: {err}");
            assert!(
                err.contains(&format!("parameter \"{name}\" is not supported: {why}")),
                "{url}: {err}"
            );
        }
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }
}
