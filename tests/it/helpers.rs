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
