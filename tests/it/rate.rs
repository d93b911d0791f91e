//! `--max-rate`: a push under the cap takes at least the time its bytes need at the cap
//! (a lower bound, not a speed target); a rate of 0 is refused.
use crate::helpers::*;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

#[test]
fn max_rate_caps_the_bytes_a_push_sends() {
    let big = BigPath::new("max-rate", 16 * MIB);
    let cache = tempdir();
    let url = format!("file://{}", cache.path().display());
    let started = Instant::now();
    let out = run(narflow().args([
        "push",
        "--unsigned",
        "--json",
        "--max-rate",
        "4M",
        "--to",
        &url,
        &big.path,
    ]));
    let took = started.elapsed();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["uploaded"], 1, "{summary}");
    // Random bytes do not compress: over 16 MiB go to the cache. At 4 MiB/s, less the
    // 0.4 MiB burst, that is 3.9 s at least.
    assert!(
        summary["file_bytes"].as_u64().unwrap() >= 16 * MIB,
        "{summary}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "16 MiB at --max-rate 4M went up in {took:?}"
    );
}

#[test]
fn a_max_rate_of_0_is_refused_by_name() {
    let cache = tempdir();
    let out = narflow()
        .args(["push", "--unsigned", "--max-rate", "0", "--to"])
        .arg(format!("file://{}", cache.path().display()))
        .arg("/nix/store/qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-p")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("max-rate 0"), "{err}");
}
