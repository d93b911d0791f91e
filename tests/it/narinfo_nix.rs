//! narinfo and signing against real Nix 2.8, both ways: we parse, re-render byte for byte
//! and verify the narinfos and signatures Nix writes; Nix reads and trusts the narinfos
//! and signatures we write.
//!
//! Every test builds fresh store paths (the names carry [`unique`]), so runs never see
//! each other's signatures.
use crate::helpers::{run, stdout, tempdir, unique};
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::{SigningKey, VerifyingKey};
use narflow::format::store_path::StorePath;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const STORE: &str = "/nix/store";

/// `nix-store --generate-binary-cache-key NAME` into `dir`; returns (secret, public) paths.
fn generate_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (sec, public) = (
        dir.join(format!("{name}.sec")),
        dir.join(format!("{name}.pub")),
    );
    run(Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&sec)
        .arg(&public));
    (sec, public)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Builds a small closure and returns the top path. The top output refers to a built
/// dependency (which refers to itself) and to a `builtins.toFile` (content-addressed, no
/// deriver), so the narinfos cover References, self-references, Deriver and CA.
fn build_closure(dir: &Path) -> String {
    let tag = unique("nfx");
    let expr = format!(
        r#"let
  file = builtins.toFile "narinfo-file" "{tag}";
  dep = derivation {{
    name = "narinfo-dep"; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo $out {tag} > $out" ];
  }};
in derivation {{
  name = "narinfo-top"; system = builtins.currentSystem; builder = "/bin/sh";
  args = [ "-c" "echo ${{dep}} ${{file}} > $out" ];
}}
"#
    );
    let file = dir.join("closure.nix");
    std::fs::write(&file, expr).unwrap();
    stdout(
        Command::new("nix-build")
            .arg(&file)
            .arg("--no-out-link")
            // No network: never ask cache.nixos.org.
            .args(["--option", "substituters", ""]),
    )
}

/// `nix-store -qR PATH` as store paths.
fn closure_of(path: &str) -> BTreeSet<StorePath> {
    stdout(Command::new("nix-store").arg("-qR").arg(path))
        .lines()
        .map(|p| StorePath::from_absolute_path(p, STORE).unwrap())
        .collect()
}

/// `nix copy --to URL PATH` (the closure).
fn nix_copy(url: &str, path: &str) {
    run(Command::new("nix").args(["copy", "--to", url]).arg(path));
}

/// Every `<hash>.narinfo` at the cache root, with its text.
fn narinfos(cache: &Path) -> Vec<(PathBuf, String)> {
    let mut out: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "narinfo"))
        .map(|p| {
            let text = read(&p);
            (p, text)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn generated_key_pair_matches_nix() {
    let dir = tempdir();
    let (sec, public) = generate_key(dir.path(), "narflow-test-1");
    let sec_text = read(&sec);
    let key = SigningKey::parse(&sec_text).unwrap();
    assert_eq!(key.name(), "narflow-test-1");
    assert_eq!(key.verifying_key().to_string(), read(&public).trim());
    assert_eq!(key.to_nix_string(), sec_text.trim());
    assert_eq!(
        VerifyingKey::parse(&read(&public)).unwrap(),
        key.verifying_key()
    );
}

#[test]
fn nix_narinfos_parse_render_and_verify() {
    let dir = tempdir();
    let (sec, public) = generate_key(dir.path(), "narflow-test-nix");
    let key = VerifyingKey::parse(&read(&public)).unwrap();
    let top = build_closure(dir.path());
    run(Command::new("nix")
        .args(["store", "sign", "-r", "--key-file"])
        .arg(&sec)
        .arg(&top));
    let closure = closure_of(&top);
    assert_eq!(closure.len(), 3, "{closure:?}");

    for compression in ["xz", "zstd", "none"] {
        let cache = dir.path().join(format!("cache-{compression}"));
        nix_copy(
            &format!("file://{}?compression={compression}", cache.display()),
            &top,
        );
        let mut seen = BTreeSet::new();
        for (file, text) in narinfos(&cache) {
            let info = NarInfo::parse(&text, STORE)
                .unwrap_or_else(|e| panic!("{}: {e}\n{text}", file.display()));
            assert_eq!(
                info.render(STORE),
                text,
                "{} does not re-render byte for byte",
                file.display()
            );
            assert_eq!(
                file.file_stem().unwrap().to_str().unwrap(),
                info.store_path.hash_part()
            );
            assert_eq!(info.compression, compression);
            let refs = stdout(
                Command::new("nix-store")
                    .args(["-q", "--references"])
                    .arg(info.store_path.to_absolute(STORE)),
            );
            let refs: BTreeSet<_> = refs
                .lines()
                .map(|p| StorePath::from_absolute_path(p, STORE).unwrap())
                .collect();
            assert_eq!(info.references, refs.into_iter().collect::<Vec<_>>());

            let fingerprint = info.fingerprint(STORE);
            let ours: Vec<_> = info
                .sigs
                .iter()
                .filter(|s| s.key_name == key.name())
                .collect();
            assert_eq!(ours.len(), 1, "{text}");
            assert!(
                key.verify(&fingerprint, ours[0]),
                "Nix's signature does not verify over our fingerprint {fingerprint:?}\n{text}"
            );
            assert_eq!(info.valid_signatures(STORE, std::slice::from_ref(&key)), 1);
            seen.insert(info.store_path);
        }
        assert_eq!(seen, closure, "one narinfo per closure member");
    }
}

/// Copies the closure of a fresh, unsigned build to a `file://` cache, then replaces every
/// narinfo Nix wrote with ours, signed with our key.
fn cache_with_our_narinfos(dir: &Path, key: &SigningKey) -> (String, PathBuf) {
    let top = build_closure(dir);
    let cache = dir.join("cache");
    nix_copy(&format!("file://{}", cache.display()), &top);
    for (file, text) in narinfos(&cache) {
        let mut info = NarInfo::parse(&text, STORE).unwrap();
        info.sigs.clear();
        info.sign(key, STORE);
        let ours = info.render(STORE);
        assert_ne!(ours, text, "Nix wrote a signature we did not expect");
        std::fs::write(&file, ours).unwrap();
    }
    (top, cache)
}

fn nix_store_verify(cache: &Path, trusted: &str, path: &str) -> std::process::Output {
    Command::new("nix")
        .args(["store", "verify", "--store"])
        .arg(format!("file://{}", cache.display()))
        .args(["--trusted-public-keys", trusted, "--sigs-needed", "1"])
        .arg(path)
        .output()
        .expect("run nix store verify")
}

#[test]
fn nix_accepts_our_narinfos_and_signatures() {
    let dir = tempdir();
    let key = SigningKey::from_seed("narflow-test-ours", *b"narflow narinfo test seed 32 b..");
    let public = key.verifying_key().to_string();
    let (top, cache) = cache_with_our_narinfos(dir.path(), &key);
    let store = format!("file://{}", cache.display());

    // Nix reads our narinfo and reports our signature.
    let info = NarInfo::parse(
        &read(&cache.join(format!(
            "{}.narinfo",
            StorePath::from_absolute_path(&top, STORE)
                .unwrap()
                .hash_part()
        ))),
        STORE,
    )
    .unwrap();
    let json = stdout(
        Command::new("nix")
            .args(["path-info", "--json", "--store", &store])
            .arg(&top),
    );
    assert!(
        json.contains(&format!("\"signatures\":[\"{}\"]", info.sigs[0])),
        "{json}"
    );

    // Nix trusts it with our public key, for the whole closure, NAR contents checked too.
    let out = nix_store_verify(&cache, &public, &top);
    assert!(
        out.status.success(),
        "nix store verify failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(Command::new("nix")
        .args(["store", "verify", "-r", "--store", &store])
        .args(["--trusted-public-keys", &public, "--sigs-needed", "1"])
        .arg(&top));
    assert!(out.status.success());

    // ... and not with another key, whether it has another name or the same one.
    let other = SigningKey::from_seed("narflow-test-other", [9; 32]).verifying_key();
    let same_name = SigningKey::from_seed("narflow-test-ours", [9; 32]).verifying_key();
    for wrong in [other.to_string(), same_name.to_string()] {
        let out = nix_store_verify(&cache, &wrong, &top);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Exit status 2: "some path is untrusted".
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("is untrusted"), "{stderr}");
    }
}
