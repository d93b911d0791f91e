//! `narflow push` to a file:// cache, checked by real Nix substituting from it.
use crate::helpers::*;
use std::path::Path;

fn cache_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn narinfo_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".narinfo")
        })
        .count()
}

/// Pushes `paths` with a fresh key and returns (cache dir, key, push output).
fn push(extra: &[&str], paths: &[String]) -> (tempfile::TempDir, NixKey, std::process::Output) {
    let cache = tempdir();
    let key = nix_generate_key("narflow-test-1");
    let out = narflow()
        .args(["push", "--to", &cache_url(cache.path()), "--key-file"])
        .arg(&key.secret)
        .args(extra)
        .args(paths)
        .output()
        .unwrap();
    (cache, key, out)
}

fn assert_substitutes(cache: &Path, key: &NixKey, paths: &[String]) {
    let root = tempdir();
    nix_substitute(root.path(), &cache_url(cache), &key.public, paths)
        .expect("Nix substitutes from the cache");
    let store = format!("local?root={}", root.path().display());
    let theirs = nix_path_info(Some(&store), paths);
    let ours = nix_path_info(None, paths);
    for (a, b) in theirs
        .as_array()
        .unwrap()
        .iter()
        .zip(ours.as_array().unwrap())
    {
        assert_eq!(a["path"], b["path"]);
        assert_eq!(a["narHash"], b["narHash"], "{}", a["path"]);
        assert_eq!(a["narSize"], b["narSize"]);
        assert_eq!(a["references"], b["references"]);
    }
}

#[test]
fn closure_of_derivations_is_substituted_by_nix_with_signatures_required() {
    let top = nix_build_chain("push-chain", 24);
    let closure = nix_closure(&top);
    assert!(closure.len() >= 20, "{closure:?}");
    let (cache, key, out) = push(&["--json"], std::slice::from_ref(&top));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["uploaded"], closure.len());
    assert_eq!(summary["failed"], 0);
    assert_eq!(narinfo_count(cache.path()), closure.len());
    assert_eq!(
        std::fs::read_to_string(cache.path().join("nix-cache-info")).unwrap(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
    );

    // Nix refuses the cache when it trusts another key.
    let other = nix_generate_key("narflow-test-other");
    let root = tempdir();
    let err = nix_substitute(
        root.path(),
        &cache_url(cache.path()),
        &other.public,
        std::slice::from_ref(&top),
    )
    .expect_err("a wrong trusted key must make substitution fail");
    assert!(
        err.contains("is not signed by any of the keys in 'trusted-public-keys'"),
        "{err}"
    );

    assert_substitutes(cache.path(), &key, &closure);

    // A second push finds everything in the cache and writes nothing.
    let again = narflow()
        .args([
            "push",
            "--json",
            "--to",
            &cache_url(cache.path()),
            "--key-file",
        ])
        .arg(&key.secret)
        .arg(&top)
        .output()
        .unwrap();
    assert!(again.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(
        (
            summary["uploaded"].as_u64(),
            summary["already_present"].as_u64()
        ),
        (Some(0), Some(closure.len() as u64))
    );
}

#[test]
fn xz_and_uncompressed_caches_are_substituted_too() {
    let top = nix_build_chain("push-xz", 3);
    for (compression, ext) in [("xz", ".nar.xz"), ("none", ".nar")] {
        let (cache, key, out) = push(&["--compression", compression], std::slice::from_ref(&top));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nars: Vec<_> = std::fs::read_dir(cache.path().join("nar"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(nars.len(), 3);
        assert!(
            nars.iter().all(|n| n.to_string_lossy().ends_with(ext)),
            "{nars:?}"
        );
        assert_substitutes(cache.path(), &key, std::slice::from_ref(&top));
    }
}

#[test]
fn store_signatures_are_kept_and_ours_added() {
    let top = nix_build_chain("push-sigs", 1);
    let store_key = nix_generate_key("store-key-1");
    run(std::process::Command::new("nix")
        .args(["store", "sign", "--key-file"])
        .arg(&store_key.secret)
        .arg(&top));
    let (cache, _key, out) = push(&[], std::slice::from_ref(&top));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = &top["/nix/store/".len()..][..32];
    let text = std::fs::read_to_string(cache.path().join(format!("{hash}.narinfo"))).unwrap();
    let sigs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("Sig: "))
        .collect();
    assert_eq!(sigs.len(), 2, "{text}");
    assert!(
        sigs.iter().any(|s| s.starts_with("store-key-1:"))
            && sigs.iter().any(|s| s.starts_with("narflow-test-1:"))
    );
    // Either key alone is enough for Nix.
    assert_substitutes(cache.path(), &store_key, std::slice::from_ref(&top));
}

#[test]
fn a_corrupt_store_path_is_refused_and_nothing_is_published_for_it() {
    let src = tempdir();
    let file = src.path().join(unique("corrupt"));
    std::fs::write(&file, "original contents\n").unwrap();
    let path = nix_store_add(&file);
    // Corrupt it behind Nix's back (same size, other bytes).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, "tampered contents\n").unwrap();
    let (cache, _key, out) = push(&[], std::slice::from_ref(&path));
    // Put the original back before asserting, so a failure leaves the store valid.
    std::fs::write(&path, "original contents\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&path) && stderr.contains("is corrupt"),
        "{stderr}"
    );
    assert_eq!(narinfo_count(cache.path()), 0);
    assert_eq!(
        std::fs::read_dir(cache.path().join("nar")).unwrap().count(),
        0,
        "no NAR, not even a temporary one"
    );
}

#[test]
fn bad_inputs_get_one_clear_line_and_the_right_exit_code() {
    let good = nix_build_chain("push-bad-inputs", 1);
    let missing = "/nix/store/00000000000000000000000000000000-missing".to_owned();
    let (cache, _key, out) = push(&[], &[good.clone(), missing.clone(), "/etc/passwd".into()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&missing) && l.contains("no such store path")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("/etc/passwd") && l.contains("not in the Nix store")),
        "{stderr}"
    );
    assert_eq!(
        narinfo_count(cache.path()),
        1,
        "the good path still went up"
    );

    // Configuration errors: exit 2 and nothing written.
    let cache = tempdir();
    let url = cache_url(&cache.path().join("c"));
    let out = narflow()
        .args(["push", "--to", &url, &good])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no signing key"));
    let out = narflow()
        .args([
            "push",
            "--to",
            &url,
            "--key-file",
            "/nonexistent/key",
            &good,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read key file /nonexistent/key"));
    let out = narflow()
        .args(["push", "--unsigned", "--to", "http://x", &good])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unsupported scheme"));
    assert!(!cache.path().join("c").exists());
}

#[test]
fn paths_from_stdin_and_unsigned() {
    use std::io::Write;
    let top = nix_build_chain("push-stdin", 2);
    let cache = tempdir();
    let mut child = narflow()
        .args([
            "push",
            "--unsigned",
            "--no-closure",
            "--to",
            &cache_url(cache.path()),
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let closure = nix_closure(&top);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(closure.join("\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(narinfo_count(cache.path()), 2);
    let text = std::fs::read_to_string(
        cache
            .path()
            .join(format!("{}.narinfo", &top["/nix/store/".len()..][..32])),
    )
    .unwrap();
    assert!(!text.contains("Sig: "), "{text}");
}

#[test]
fn no_closure_refuses_a_path_whose_references_are_missing() {
    let top = nix_build_chain("push-noclosure", 2);
    let (cache, _key, out) = push(&["--no-closure"], std::slice::from_ref(&top));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is not in the cache (push without --no-closure)"),
        "{stderr}"
    );
    assert_eq!(narinfo_count(cache.path()), 0);
}

#[test]
fn nars_split_into_many_frames_decode_with_nix_and_the_command_line_tools() {
    // 5 MiB of partly compressible data in 1 MiB chunks: six independent frames/streams.
    let src = tempdir();
    let dir = src.path().join(unique("frames"));
    std::fs::create_dir(&dir).unwrap();
    let data: Vec<u8> = (0..5 * 1024 * 1024 + 12345u32)
        .map(|i| {
            if i % 5 < 3 {
                (i / 5 % 97) as u8
            } else {
                (i.wrapping_mul(2654435761) >> 24) as u8
            }
        })
        .collect();
    std::fs::write(dir.join("blob"), &data).unwrap();
    let path = nix_store_add(&dir);
    let nar = nix_store_dump(Path::new(&path));
    for (compression, tool) in [("zstd", "zstd"), ("xz", "xz")] {
        let (cache, key, out) = push(
            &["--compression", compression, "--chunk-size", "1M"],
            std::slice::from_ref(&path),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nar_dir = cache.path().join("nar");
        let file = std::fs::read_dir(&nar_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let decoded = run(std::process::Command::new(tool).arg("-dc").arg(&file)).stdout;
        assert!(decoded == nar, "{tool} -dc does not give back the NAR");
        // Ask each tool how many independent frames (zstd) or streams (xz) it sees.
        let frames: usize = if tool == "zstd" {
            let listing = stdout(std::process::Command::new("zstd").arg("-lv").arg(&file));
            let line = listing
                .lines()
                .find_map(|l| l.strip_prefix("# Zstandard Frames: "))
                .expect("zstd -lv");
            line.trim().parse().unwrap()
        } else {
            let listing = stdout(
                std::process::Command::new("xz")
                    .args(["--robot", "--list"])
                    .arg(&file),
            );
            let line = listing
                .lines()
                .find(|l| l.starts_with("file\t"))
                .expect("xz --list");
            line.split('\t').nth(1).unwrap().parse().unwrap()
        };
        assert!(frames >= 6, "{compression}: {frames} frames");
        assert_substitutes(cache.path(), &key, std::slice::from_ref(&path));
    }
}

#[test]
fn no_closure_refuses_every_referrer_of_a_refused_path() {
    // d0 <- d1 <- d2: pushing d2 and d1 without their closure, d0 is not in the cache, so
    // d1 is refused, and d2 with it (it was published without d1 before).
    let top = nix_build_chain("push-noclosure-transitive", 3);
    let closure = nix_closure(&top);
    let d1 = closure
        .iter()
        .find(|p| p.ends_with("-chain-1"))
        .unwrap()
        .clone();
    let (cache, _key, out) = push(&["--no-closure"], &[top.clone(), d1.clone()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&d1) && l.contains("is not in the cache")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&format!("{top}: not published: its reference {d1} failed"))),
        "{top} not reported failed:\n{stderr}"
    );
    assert_eq!(narinfo_count(cache.path()), 0, "{stderr}");
}

/// A file:// cache that deletes one narinfo right after the first look at the cache, as
/// a concurrent `gc` could.
#[derive(Debug)]
struct DeletesAfterFirstLook {
    inner: narflow::cache::file::FileCache,
    dir: std::path::PathBuf,
    victim: String,
    looked: std::sync::atomic::AtomicUsize,
    /// The paths some look found present.
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

use narflow::cache::{BinaryCache, CacheError, NarUpload, Published};
use narflow::format::narinfo::NarInfo;
use narflow::format::store_path::StorePath;

impl BinaryCache for DeletesAfterFirstLook {
    fn url(&self) -> &str {
        self.inner.url()
    }
    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError> {
        self.inner.ensure_cache_info(store_dir)
    }
    fn has_narinfo(&self, path: &StorePath) -> Result<bool, CacheError> {
        Ok(self.has_narinfos(std::slice::from_ref(path))?[0])
    }
    fn has_narinfos(&self, paths: &[StorePath]) -> Result<Vec<bool>, CacheError> {
        let r = self.inner.has_narinfos(paths)?;
        let mut seen = self.seen.lock().unwrap();
        for (p, present) in paths.iter().zip(&r) {
            if *present {
                seen.insert(p.base_name().to_owned());
            }
        }
        if self
            .looked
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            std::fs::remove_file(self.dir.join(&self.victim)).unwrap();
        }
        Ok(r)
    }
    fn has_object(&self, key: &str) -> Result<bool, CacheError> {
        self.inner.has_object(key)
    }
    fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        self.inner.object_size(key)
    }
    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError> {
        self.inner.get_narinfo(path)
    }
    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        self.inner.get_text(key)
    }
    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        self.inner.begin_nar(nar_size)
    }
    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
        self.inner.put_narinfo(path, text)
    }
    fn put_narinfos(&self, narinfos: &[(StorePath, String)]) -> Result<(), CacheError> {
        self.inner.put_narinfos(narinfos)
    }
    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
    ) -> Result<Vec<Published>, CacheError> {
        self.inner.publish_narinfos(store_dir, narinfos)
    }
    fn sync(&self) -> Result<(), CacheError> {
        self.inner.sync()
    }
}

#[test]
fn a_reference_is_trusted_only_as_the_cache_was_seen() {
    use narflow::pipeline::outcome::Outcome;
    use narflow::pipeline::{self, PushOptions};
    // d0 <- d1 <- d2, with d0 in the cache already; d0's narinfo disappears right after
    // the first look. Whatever the push publishes must refer only to paths a look found
    // or that the push itself published.
    let top = nix_build_chain("push-deleted-ref", 3);
    let closure = nix_closure(&top);
    let d0 = closure
        .iter()
        .find(|p| p.ends_with("-chain-0"))
        .unwrap()
        .clone();
    let (cache, key, out) = push(&[], std::slice::from_ref(&d0));
    assert!(out.status.success());
    let store = narflow::store::LocalStore::open(
        "/nix/store",
        std::path::Path::new("/nix/var/nix/db/db.sqlite"),
    );
    let wrapped = DeletesAfterFirstLook {
        inner: narflow::cache::file::FileCache::open(cache.path(), &cache_url(cache.path()))
            .unwrap(),
        dir: cache.path().to_owned(),
        victim: narinfo_key(&d0),
        looked: Default::default(),
        seen: Default::default(),
    };
    let sk =
        narflow::format::signing::SigningKey::parse(&std::fs::read_to_string(&key.secret).unwrap())
            .unwrap();
    let opts = PushOptions::new(
        narflow::format::compression::CompressionSettings::new(
            narflow::format::compression::Compression::Zstd,
            None,
        )
        .unwrap(),
        vec![sk],
    );
    let paths = [StorePath::from_absolute_path_prefix(&top, "/nix/store").unwrap()];
    let report = pipeline::push(
        &store,
        &wrapped,
        &paths,
        &opts,
        &pipeline::outcome::NoProgress,
    )
    .unwrap();
    let uploaded: std::collections::HashSet<String> = report
        .results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Uploaded { .. }))
        .map(|r| r.path["/nix/store/".len()..].to_owned())
        .collect();
    let seen = wrapped.seen.lock().unwrap().clone();
    for base in &uploaded {
        let text =
            std::fs::read_to_string(cache.path().join(format!("{}.narinfo", &base[..32]))).unwrap();
        for r in narinfo_field(&text, "References")
            .unwrap_or_default()
            .split_whitespace()
            .filter(|r| r != base)
        {
            assert!(
                uploaded.contains(r) || seen.contains(r),
                "{base} published, but its reference {r} was neither seen in the cache nor \
                 published: {:?}",
                report.results
            );
        }
    }
}
