//! Shared helpers: run real Nix, make store paths, run the narflow binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `cmd`, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run scripts/setup-nix)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout of a successful command, trimmed.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout)
        .expect("utf-8 stdout")
        .trim()
        .to_owned()
}

/// `nix-store --add PATH`: adds a file or tree to the real store, returns the store path.
pub fn nix_store_add(path: &Path) -> String {
    stdout(Command::new("nix-store").arg("--add").arg(path))
}

/// `nix-store --dump PATH`: the NAR that real Nix makes of a path.
pub fn nix_store_dump(path: &Path) -> Vec<u8> {
    run(Command::new("nix-store").arg("--dump").arg(path)).stdout
}

/// The narflow binary built for this test run.
pub fn narflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_narflow"))
}

/// A fresh temporary directory, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("narflow-test-")
        .tempdir()
        .expect("tempdir")
}

/// A unique string for this process and call, so store paths made by different runs differ.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{tag}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn path_buf(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// A signing key pair made by real Nix: (secret key file, public key string).
pub struct NixKey {
    pub secret: PathBuf,
    pub public: String,
    _dir: tempfile::TempDir,
}

pub fn nix_generate_key(name: &str) -> NixKey {
    let dir = tempdir();
    let (secret, public) = (dir.path().join("secret"), dir.path().join("public"));
    run(Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&secret)
        .arg(&public));
    let public = std::fs::read_to_string(&public).unwrap().trim().to_owned();
    NixKey {
        secret,
        public,
        _dir: dir,
    }
}

/// Writes `expr` to a .nix file and builds it with real Nix; returns the output paths.
pub fn nix_build(expr: &str) -> Vec<String> {
    let dir = tempdir();
    let file = dir.path().join("default.nix");
    std::fs::write(&file, expr).unwrap();
    // No substituters: the machine is offline and Nix would retry cache.nixos.org each time.
    let mut cmd = Command::new("nix-build");
    cmd.arg(&file)
        .arg("--no-out-link")
        .args(["--option", "substituters", ""]);
    stdout(&mut cmd).lines().map(str::to_owned).collect()
}

/// A chain of `n` input-addressed derivations built by real Nix, each referencing the one
/// before it (and every third one the one two before, so the graph is not just a line).
/// Outputs alternate between a file and a directory holding an executable, a symlink to its
/// reference, and an empty file. Returns the last output (whose closure is all `n`).
pub fn nix_build_chain(tag: &str, n: usize) -> String {
    let u = unique(tag);
    let mut expr = String::from("let\n");
    for i in 0..n {
        let refs = match i {
            0 => String::new(),
            _ if i % 3 == 0 && i >= 2 => format!("${{d{}}} ${{d{}}}", i - 1, i - 2),
            _ => format!("${{d{}}}", i - 1),
        };
        let script = if i % 2 == 0 {
            format!("echo {u}-{i} {refs} > $out")
        } else {
            format!(
                "/bin/mkdir -p $out/bin $out/empty-dir && echo '#!/bin/sh' > $out/bin/run && /bin/chmod +x $out/bin/run && \
                 : > $out/empty && echo {u}-{i} {refs} > $out/refs{}",
                if i > 0 {
                    format!(" && /bin/ln -s ${{d{}}} $out/link", i - 1)
                } else {
                    String::new()
                }
            )
        };
        expr.push_str(&format!(
            "  d{i} = derivation {{ name = \"chain-{i}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"{}\" ]; }};\n",
            script.replace('"', "\\\"")
        ));
    }
    expr.push_str(&format!("in d{}\n", n - 1));
    let out = nix_build(&expr);
    assert_eq!(out.len(), 1, "{out:?}");
    out.into_iter().next().unwrap()
}

/// `nix-store -qR`: the closure real Nix computes.
pub fn nix_closure(path: &str) -> Vec<String> {
    stdout(Command::new("nix-store").arg("-qR").arg(path))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Substitutes `paths` from `cache_url` into a fresh chroot store under `root`, with
/// signatures required and only `trusted_key` trusted. Returns Nix's output on failure.
pub fn nix_substitute(
    root: &Path,
    cache_url: &str,
    trusted_key: &str,
    paths: &[String],
) -> Result<(), String> {
    let out = Command::new("nix-store")
        .arg("--store")
        .arg(format!("local?root={}", root.display()))
        .arg("--realise")
        .args(paths)
        .args(["--option", "substituters", cache_url])
        .args(["--option", "trusted-public-keys", trusted_key])
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .output()
        .expect("nix-store");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `nix path-info --json` of `paths` in a store (`None`: the system store), parsed.
pub fn nix_path_info(store: Option<&str>, paths: &[String]) -> serde_json::Value {
    let mut cmd = Command::new("nix");
    cmd.args(["path-info", "--json", "--offline"]);
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    serde_json::from_str(&stdout(cmd.args(paths))).expect("path-info JSON")
}
