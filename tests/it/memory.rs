//! `--memory` bounds the whole process: the real `narflow push` of large, incompressible
//! store paths, at two budgets, into a `file://` cache and into S3, with its peak RSS
//! (GNU time's maximum resident set size) held under the budget plus
//! `memory::MEMORY_OVERHEAD`.
//!
//! The workload has one large path (chunked, compressed in parallel, multipart on S3) and
//! many medium ones (each below one S3 part, so S3 buffers every one whole until its PUT,
//! many at once): together they fill every buffer the budget pays for, the cache's
//! included.
use crate::helpers::*;
use narflow::memory::MEMORY_OVERHEAD;
use std::ffi::{OsStr, OsString};
use std::process::Command;

const MIB: u64 = 1 << 20;
/// Budgets measured: a small one (S3 then sends parts of its smallest size, 5 MiB, two at
/// a time), the default one and twice that.
const BUDGETS: [u64; 3] = [32 * MIB, 128 * MIB, 256 * MIB];

struct Workload {
    paths: Vec<BigPath>,
}

impl Workload {
    /// One path of 192 MiB and 24 of 6 MiB, all incompressible.
    fn new(tag: &str) -> Workload {
        let mut paths = vec![BigPath::new(&format!("{tag}-large"), 192 * MIB)];
        for i in 0..24 {
            paths.push(BigPath::new(&format!("{tag}-medium-{i}"), 6 * MIB));
        }
        Workload { paths }
    }
    fn args(&self) -> Vec<String> {
        self.paths.iter().map(|p| p.path.clone()).collect()
    }
}

/// Runs `narflow push --memory BUDGET` under GNU time; returns its peak RSS in bytes.
fn peak_rss_of_push(url: &str, key: &NixKey, budget: u64, paths: &[String]) -> u64 {
    let mut args: Vec<OsString> = vec!["--key-file".into(), key.secret.clone().into()];
    args.extend(paths.iter().map(OsString::from));
    peak_rss_of_push_with(url, budget, &args).0
}

/// Runs `narflow push --to URL --memory BUDGET ARGS...` under GNU time, which must succeed;
/// returns its peak RSS in bytes and its standard output.
pub fn peak_rss_of_push_with(url: &str, budget: u64, args: &[impl AsRef<OsStr>]) -> (u64, Vec<u8>) {
    let dir = tempdir();
    let rss = dir.path().join("rss");
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        .arg(env!("CARGO_BIN_EXE_narflow"))
        .env("XDG_STATE_HOME", dir.path())
        .args(["push", "--to", url, "--memory"])
        .arg(format!("{}M", budget / MIB))
        .args(args)
        .output()
        .expect("run /usr/bin/time (GNU time)");
    assert!(
        out.status.success(),
        "push --memory {}M to {url} failed:\n{}",
        budget / MIB,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&rss).unwrap();
    let kib: u64 = text
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("GNU time wrote {text:?}"));
    (kib * 1024, out.stdout)
}

/// Asserts that `rss` is within `budget` plus [`MEMORY_OVERHEAD`] (and prints both).
pub fn assert_bounded(what: &str, budget: u64, rss: u64) {
    let bound = budget + MEMORY_OVERHEAD;
    println!(
        "{what}: --memory {} MiB: peak RSS {} MiB (bound {} MiB)",
        budget / MIB,
        rss / MIB,
        bound / MIB
    );
    assert!(
        rss <= bound,
        "{what}: --memory {} MiB: peak RSS {} MiB is above the budget plus {} MiB",
        budget / MIB,
        rss / MIB,
        MEMORY_OVERHEAD / MIB
    );
}

#[test]
fn memory_bounds_the_peak_rss_of_a_push_to_a_directory() {
    let work = Workload::new("memory-file");
    let key = nix_generate_key("memory-test-1");
    for budget in BUDGETS {
        let cache = tempdir();
        let url = format!("file://{}", cache.path().display());
        let rss = peak_rss_of_push(&url, &key, budget, &work.args());
        assert_bounded("file://", budget, rss);
    }
}

#[test]
fn memory_bounds_the_peak_rss_of_a_push_to_s3() {
    let Some(s3) = s3_env() else { return };
    let client = s3.client();
    let key = nix_generate_key("memory-test-1");
    for budget in BUDGETS {
        // Fresh paths per run: the bucket is shared, and a path already there is skipped.
        let work = Workload::new(&format!("memory-s3-{}m", budget / MIB));
        let rss = peak_rss_of_push(&s3.url(""), &key, budget, &work.args());
        // Our own large objects go (the narinfos name them; they are ours alone).
        for p in &work.paths {
            let text = client.get_text(&narinfo_key(&p.path));
            client.delete(&narinfo_key(&p.path));
            if let Some(nar) = text.as_deref().and_then(|t| narinfo_field(t, "URL")) {
                client.delete(nar);
            }
        }
        assert_bounded("S3", budget, rss);
    }
}
