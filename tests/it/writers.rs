//! Concurrent writers on one cache: four `narflow push` processes with overlapping
//! closures into one file:// directory and into one S3 bucket, while a watcher reads the
//! cache and checks Nix's invariant at every moment (every visible narinfo's NAR is
//! complete, its references' narinfos are visible); and the merge rule: a second writer
//! with another key adds its signature to a narinfo instead of dropping the first's.
//!
//! On S3 the bucket is shared (see `s3.rs`): the tests look only at their own paths.
use crate::helpers::*;
use narflow::format::hash::Sha256;
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::VerifyingKey;
use std::collections::HashSet;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};

const WRITERS: usize = 4;

/// Where the watcher reads a cache.
trait View: Sync {
    /// The narinfo text of a full store path, if visible.
    fn narinfo(&self, path: &str) -> Option<String>;
    /// The bytes of an object, if present.
    fn object(&self, key: &str) -> Option<Vec<u8>>;
    fn has_narinfo(&self, base_name: &str) -> bool;
}

struct FileView(std::path::PathBuf);

impl View for FileView {
    fn narinfo(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.0.join(narinfo_key(path))).ok()
    }
    fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.0.join(key)).ok()
    }
    fn has_narinfo(&self, base_name: &str) -> bool {
        self.0
            .join(format!("{}.narinfo", &base_name[..32]))
            .exists()
    }
}

impl View for S3Client {
    fn narinfo(&self, path: &str) -> Option<String> {
        self.get_text(&narinfo_key(path))
    }
    fn object(&self, key: &str) -> Option<Vec<u8>> {
        self.get(key)
    }
    fn has_narinfo(&self, base_name: &str) -> bool {
        self.exists(&format!("{}.narinfo", &base_name[..32]))
    }
}

/// Reads every narinfo of `paths` until `stop` is set (then once more), checking that each
/// visible one parses, names its path, has a complete NAR (FileSize and FileHash) and
/// visible references. Returns (rounds, most narinfos seen in one round).
fn watch(view: &dyn View, paths: &[String], stop: &AtomicBool) -> Result<(usize, usize), String> {
    let mut verified: HashSet<String> = HashSet::new();
    let mut rounds = 0;
    let mut most = 0;
    loop {
        let last = stop.load(Ordering::SeqCst);
        let mut visible = 0;
        for path in paths {
            let Some(text) = view.narinfo(path) else {
                continue;
            };
            visible += 1;
            let n = NarInfo::parse(&text, "/nix/store")
                .map_err(|e| format!("{path}: a visible narinfo does not parse: {e}\n{text}"))?;
            if n.store_path.to_absolute("/nix/store") != *path {
                return Err(format!("{path}: its narinfo names {}", n.store_path));
            }
            if !verified.contains(&n.url) {
                let nar = view
                    .object(&n.url)
                    .ok_or_else(|| format!("{path}: visible narinfo, its NAR {} is not", n.url))?;
                if Some(nar.len() as u64) != n.file_size
                    || Some(Sha256::digest(&nar)) != n.file_hash
                {
                    return Err(format!(
                        "{path}: its NAR {} is incomplete ({} bytes, FileSize {:?})",
                        n.url,
                        nar.len(),
                        n.file_size
                    ));
                }
                verified.insert(n.url.clone());
            }
            for r in n.references.iter().filter(|r| **r != n.store_path) {
                if !view.has_narinfo(r.base_name()) {
                    return Err(format!("{path}: visible, its reference {r} is not"));
                }
            }
        }
        rounds += 1;
        most = most.max(visible);
        if last {
            return Ok((rounds, most));
        }
    }
}

/// The output of derivation `chain-<i>` in a closure made by [`nix_build_chain`].
fn chain_member(closure: &[String], i: usize) -> String {
    let suffix = format!("-chain-{i}");
    closure
        .iter()
        .find(|p| p.ends_with(&suffix))
        .unwrap_or_else(|| panic!("no {suffix} in {closure:?}"))
        .clone()
}

fn push(url: &str, key: &NixKey, paths: &[String]) -> Output {
    narflow()
        .args(["push", "--json", "--to", url, "--key-file"])
        .arg(&key.secret)
        .args(paths)
        .output()
        .expect("run narflow")
}

/// Four pushes of overlapping closures at once into `url`, watched through `view`; then
/// real Nix substitutes everything from `nix_url`. With `two_keys`, writers alternate
/// between two keys and every narinfo must end with both signatures (a cache that
/// serialises its merges, as file:// does, guarantees that even for writers that race).
fn four_writers(tag: &str, url: &str, nix_url: &str, view: &dyn View, two_keys: bool) {
    let top = nix_build_chain(tag, 16);
    let closure = nix_closure(&top);
    // Some larger paths too, shared by every writer, so NAR uploads overlap.
    let bigs: Vec<BigPath> = (0..3)
        .map(|i| BigPath::new(&format!("{tag}-big{i}"), (3 << 20) + i * 4096))
        .collect();
    let mut everything = closure.clone();
    everything.extend(bigs.iter().map(|b| b.path.clone()));
    let keys = [
        nix_generate_key("narflow-writers-1"),
        nix_generate_key("narflow-writers-2"),
    ];
    let stop = AtomicBool::new(false);
    let (watched, outputs) = std::thread::scope(|s| {
        let watcher = s.spawn(|| watch(view, &everything, &stop));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                // Writers 0 and 1 push the whole chain (with different keys when
                // `two_keys`), 2 and 3 parts of it.
                let mut paths = vec![chain_member(&closure, [15, 15, 13, 11][w])];
                paths.extend(bigs.iter().map(|b| b.path.clone()));
                let key = &keys[if two_keys { w % 2 } else { 0 }];
                s.spawn(move || push(url, key, &paths))
            })
            .collect();
        let outputs: Vec<Output> = writers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, Ordering::SeqCst);
        (watcher.join().unwrap(), outputs)
    });
    for (w, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "writer {w}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (rounds, most) = watched.unwrap_or_else(|e| panic!("invariant broken: {e}"));
    println!("watcher: {rounds} rounds");
    // The last round ran after every writer finished: everything is there.
    assert_eq!(most, everything.len());
    if two_keys {
        let public: Vec<VerifyingKey> = keys
            .iter()
            .map(|k| VerifyingKey::parse(&k.public).unwrap())
            .collect();
        for path in &everything {
            let n = NarInfo::parse(&view.narinfo(path).unwrap(), "/nix/store").unwrap();
            for k in &public {
                assert_eq!(
                    n.valid_signatures("/nix/store", std::slice::from_ref(k)),
                    1,
                    "{path}: a writer's signature was dropped ({})",
                    k.name()
                );
            }
        }
    }
    assert_nix_substitutes(nix_url, &keys[0], &everything);
}

#[test]
fn four_concurrent_writers_into_one_file_cache_keep_the_invariant() {
    let cache = tempdir();
    let url = format!("file://{}", cache.path().display());
    four_writers(
        "writers-file",
        &url,
        &url,
        &FileView(cache.path().to_owned()),
        true,
    );
}

#[test]
fn four_concurrent_writers_into_one_bucket_keep_the_invariant() {
    let Some(s3) = s3_env() else { return };
    four_writers("writers-s3", &s3.url(""), &s3.http_url, &s3.client(), false);
}

/// Pushes `path` with one key, then with another; the narinfo must end with both
/// signatures and Nix must accept it trusting either key alone.
fn merge_two_keys(url: &str, nix_url: &str, view: &dyn View, tag: &str) {
    let top = nix_build_chain(tag, 2);
    let closure = nix_closure(&top);
    let (first, second) = (
        nix_generate_key("narflow-merge-a-1"),
        nix_generate_key("narflow-merge-b-1"),
    );
    for key in [&first, &second] {
        let out = push(url, key, std::slice::from_ref(&top));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let keys: Vec<VerifyingKey> = [&first, &second]
        .iter()
        .map(|k| VerifyingKey::parse(&k.public).unwrap())
        .collect();
    for path in &closure {
        let text = view.narinfo(path).expect("narinfo");
        let n = NarInfo::parse(&text, "/nix/store").unwrap();
        for k in &keys {
            assert_eq!(
                n.valid_signatures("/nix/store", std::slice::from_ref(k)),
                1,
                "{path}: no valid signature of {}:\n{text}",
                k.name()
            );
        }
    }
    for key in [&first, &second] {
        assert_nix_substitutes(nix_url, key, &closure);
    }
    // A third push with the first key has nothing to add.
    let out = push(url, &first, std::slice::from_ref(&top));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["already_present"], closure.len(), "{summary}");
}

#[test]
fn a_second_key_adds_its_signature_on_a_file_cache() {
    let cache = tempdir();
    let url = format!("file://{}", cache.path().display());
    merge_two_keys(&url, &url, &FileView(cache.path().to_owned()), "merge-file");
}

#[test]
fn a_second_key_adds_its_signature_on_s3() {
    let Some(s3) = s3_env() else { return };
    merge_two_keys(&s3.url(""), &s3.http_url, &s3.client(), "merge-s3");
}
