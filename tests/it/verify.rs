//! `narflow verify` against a closure real Nix built and narflow pushed, into `file://` and
//! the suite's S3 server: clean, then damaged one kind at a time (and mended again), each
//! damage named with its kind and object (exit 1).
//!
//! The S3 bucket is shared by every test: there the closure is verified by path (which
//! looks at nothing outside it), and the whole-bucket kinds (leftovers, unfinished
//! uploads) are checked to name the test's own objects among whatever else is there.
use crate::helpers::*;
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::SigningKey;
use std::collections::BTreeMap;
use std::path::PathBuf;

const STORE_DIR: &str = "/nix/store";

/// The cache's objects, written and removed behind narflow's back.
pub(crate) enum Objects {
    Dir(PathBuf),
    S3(S3Client),
}

impl Objects {
    pub(crate) fn get(&self, key: &str) -> Vec<u8> {
        match self {
            Objects::Dir(d) => std::fs::read(d.join(key)).unwrap(),
            Objects::S3(c) => c.get(key).unwrap_or_else(|| panic!("{key} is missing")),
        }
    }
    pub(crate) fn put(&self, key: &str, bytes: &[u8]) {
        match self {
            Objects::Dir(d) => std::fs::write(d.join(key), bytes).unwrap(),
            Objects::S3(c) => c.put(key, bytes),
        }
    }
    pub(crate) fn exists(&self, key: &str) -> bool {
        match self {
            Objects::Dir(d) => d.join(key).exists(),
            Objects::S3(c) => c.exists(key),
        }
    }
    pub(crate) fn delete(&self, key: &str) {
        match self {
            Objects::Dir(d) => std::fs::remove_file(d.join(key)).unwrap(),
            Objects::S3(c) => c.delete(key),
        }
    }
}

/// Problems by kind: the objects named.
type Found = BTreeMap<String, Vec<String>>;

/// Runs `narflow verify` trusting `key`; its exit code and problems.
fn verify(url: &str, key: &NixKey, scope: &[&str]) -> (i32, Found) {
    let out = narflow()
        .args([
            "verify",
            "--json",
            "--cache",
            url,
            "--trusted-key",
            &key.public,
        ])
        .args(scope)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let mut found = Found::new();
    for (kind, list) in json["problems"].as_object().unwrap() {
        let objects = list.as_array().unwrap().iter();
        found.insert(
            kind.clone(),
            objects
                .map(|p| p["object"].as_str().unwrap().to_owned())
                .collect(),
        );
    }
    (out.status.code().unwrap(), found)
}

fn found(kinds: &[(&str, &str)]) -> Found {
    let mut f = Found::new();
    for (kind, object) in kinds {
        f.entry((*kind).to_owned())
            .or_default()
            .push((*object).to_owned());
    }
    f
}

/// Pushes a three-path closure to `url` signed by a new key, then damages it one kind at a
/// time, mending each before the next. `whole` says whether the cache is the test's own
/// (verified with `--all`, every problem known) or shared (verified by path).
fn damage_one_kind_at_a_time(url: &str, objects: &Objects, whole: bool) {
    let key = nix_generate_key(&unique("verify-a").replace('-', "")[..20]);
    let top = nix_build_chain("verify", 3);
    run(narflow()
        .args(["push", "--to", url, "--key-file"])
        .arg(&key.secret)
        .arg(&top));
    let scope: Vec<&str> = if whole { vec!["--all"] } else { vec![&top] };
    let clean = || assert_eq!(verify(url, &key, &scope), (0, Found::new()), "clean");

    let top_key = narinfo_key(&top);
    let top_text = String::from_utf8(objects.get(&top_key)).unwrap();
    let top_info = NarInfo::parse(&top_text, STORE_DIR).unwrap();
    let mid = top_info
        .references
        .iter()
        .find(|r| **r != top_info.store_path)
        .expect("the top of the chain has a reference")
        .to_absolute(STORE_DIR);
    let mid_key = narinfo_key(&mid);
    let mid_text = String::from_utf8(objects.get(&mid_key)).unwrap();
    let mid_nar = narinfo_field(&mid_text, "URL").unwrap().to_owned();
    let top_nar = top_info.url.clone();
    clean();

    // Reading every NAR finds nothing either.
    let contents: Vec<&str> = scope.iter().copied().chain(["--contents"]).collect();
    assert_eq!(
        verify(url, &key, &contents),
        (0, Found::new()),
        "clean NARs"
    );

    // Each damage, what verify must say, and the mending.
    let mid_nar_bytes = objects.get(&mid_nar);
    // A flipped byte keeps the size: only reading the NAR finds it.
    let mut flipped = mid_nar_bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x20;
    objects.put(&mid_nar, &flipped);
    assert_eq!(
        verify(url, &key, &scope),
        (0, Found::new()),
        "flipped byte unread"
    );
    assert_eq!(
        verify(url, &key, &contents),
        (1, found(&[("file-hash", &mid_key)])),
        "flipped byte"
    );
    objects.put(&mid_nar, &mid_nar_bytes);

    objects.put(&mid_nar, &mid_nar_bytes[..mid_nar_bytes.len() - 1]);
    assert_eq!(
        verify(url, &key, &scope),
        (1, found(&[("nar-size", &mid_key)])),
        "truncated NAR"
    );
    objects.put(&mid_nar, &mid_nar_bytes);
    clean();

    let top_nar_bytes = objects.get(&top_nar);
    objects.delete(&top_nar);
    assert_eq!(
        verify(url, &key, &scope),
        (1, found(&[("nar-missing", &top_key)])),
        "deleted NAR"
    );
    objects.put(&top_nar, &top_nar_bytes);
    clean();

    objects.delete(&mid_key);
    let mut want = vec![("missing-reference", top_key.as_str())];
    if whole {
        want.push(("orphan-nar", &mid_nar));
    }
    assert_eq!(
        verify(url, &key, &scope),
        (1, found(&want)),
        "deleted reference"
    );
    objects.put(&mid_key, mid_text.as_bytes());
    clean();

    // A signature by the trusted key, but over another path's fingerprint.
    let mid_sig = narinfo_field(&mid_text, "Sig").unwrap();
    let top_sig = narinfo_field(&top_text, "Sig").unwrap();
    objects.put(&top_key, top_text.replace(top_sig, mid_sig).as_bytes());
    assert_eq!(
        verify(url, &key, &scope),
        (1, found(&[("bad-signature", &top_key)])),
        "bad signature"
    );

    let other = nix_generate_key(&unique("verify-b").replace('-', "")[..20]);
    let other_key = SigningKey::parse(&std::fs::read_to_string(&other.secret).unwrap()).unwrap();
    let mut resigned = top_info.clone();
    resigned.sigs.clear();
    resigned.sign(&other_key, STORE_DIR);
    objects.put(&top_key, resigned.render(STORE_DIR).as_bytes());
    assert_eq!(
        verify(url, &key, &scope),
        (1, found(&[("untrusted", &top_key)])),
        "untrusted"
    );
    // Trusting that key too, it verifies.
    let out = narflow()
        .args([
            "verify",
            "--cache",
            url,
            "--trusted-key",
            &key.public,
            "--trusted-key",
            &other.public,
        ])
        .args(&scope)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    objects.put(&top_key, top_text.as_bytes());
    clean();

    // What nothing names: looked for with --all only.
    let stray = match objects {
        Objects::Dir(_) => format!("nar/.narflow-tmp-{}", unique("stray")),
        Objects::S3(_) => format!(".narflow-staging/{}", unique("stray")),
    };
    objects.put(&stray, b"half a NAR");
    let (code, f) = verify(url, &key, &["--all"]);
    assert_eq!(code, 1);
    assert!(f["leftover"].contains(&stray), "{f:?}");
    if whole {
        assert_eq!(f, found(&[("leftover", &stray)]));
    }
    assert_eq!(
        verify(url, &key, &scope).0,
        i32::from(whole),
        "by path, leftovers are not looked at"
    );
    objects.delete(&stray);
    if whole {
        clean();
    }

    if let Objects::S3(client) = objects {
        let upload = format!(".narflow-staging/{}", unique("unfinished"));
        let (id, _) = client.create_multipart(&upload);
        let (code, f) = verify(url, &key, &["--all"]);
        assert_eq!(code, 1);
        assert!(f["unfinished-upload"].contains(&upload), "{f:?}");
        client.abort_multipart(&upload, &id);
        clean();
    }
}

#[test]
fn a_file_cache_verifies_clean_and_each_damage_is_named() {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().display());
    damage_one_kind_at_a_time(&url, &Objects::Dir(dir.path().to_owned()), true);
}

#[test]
fn an_s3_cache_verifies_clean_and_each_damage_is_named() {
    let Some(s3) = s3_env() else { return };
    damage_one_kind_at_a_time(&s3.url(""), &Objects::S3(s3.client()), false);
}

#[test]
fn verify_refuses_without_a_trusted_key_or_a_scope() {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().display());
    for args in [vec!["--all"], vec![]] {
        let out = narflow()
            .args(["verify", "--cache", &url])
            .args(&args)
            .env_remove("NARFLOW_TRUSTED_KEY")
            .env_remove("NARFLOW_KEY_FILE")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

/// `.ls` listings as real Nix writes them (`write-nar-listing=1`, xz NARs) and as narflow
/// does (zstd): with `--contents` both match their NARs; a listing describing another
/// tree, or not a listing at all, is named.
#[test]
fn listings_by_nix_and_by_narflow_match_their_nars() {
    let key = nix_generate_key(&unique("verify-ls").replace('-', "")[..20]);
    let top = nix_build_chain("verify-ls", 2);
    let theirs = tempdir();
    let ours = tempdir();
    run(std::process::Command::new("nix")
        .arg("copy")
        .arg("--to")
        .arg(format!(
            "file://{}?write-nar-listing=1&secret-key={}",
            theirs.path().display(),
            key.secret.display()
        ))
        .arg(&top));
    let ours_url = format!("file://{}?write-nar-listing=1", ours.path().display());
    run(narflow()
        .args(["push", "--to", &ours_url, "--key-file"])
        .arg(&key.secret)
        .arg(&top));
    for dir in [theirs.path(), ours.path()] {
        let url = format!("file://{}", dir.display());
        let ls = dir.join(format!("{}.ls", hash_part(&top)));
        let text = std::fs::read_to_string(&ls).unwrap();
        assert_eq!(
            verify(&url, &key, &["--all", "--contents"]),
            (0, Found::new()),
            "{url}"
        );
        let object = format!("{}.ls", hash_part(&top));
        // The chain's paths hold one file each; another size is another tree.
        let other = text.replacen(r#""size":"#, r#""size":1"#, 1);
        assert_ne!(other, text);
        std::fs::write(&ls, &other).unwrap();
        assert_eq!(
            verify(&url, &key, &["--all", "--contents"]),
            (1, found(&[("listing-mismatch", &object)])),
            "{url}"
        );
        assert_eq!(verify(&url, &key, &["--all"]), (0, Found::new()), "unread");
        std::fs::write(&ls, "not a listing").unwrap();
        assert_eq!(
            verify(&url, &key, &["--all", "--contents"]),
            (1, found(&[("unparsable-listing", &object)])),
            "{url}"
        );
    }
}
