//! Tests of the bench driver: generation is deterministic, runs measure, baselines compare.

use super::*;

fn spec(kind: WorkloadKind, seed: u64, paths: usize, min: u64, max: u64) -> WorkloadSpec {
    WorkloadSpec {
        kind,
        seed,
        paths,
        min_path_bytes: min,
        max_path_bytes: max,
    }
}

fn hashes(w: &Workload) -> Vec<(String, Sha256, u64, Vec<StorePath>)> {
    w.infos
        .iter()
        .map(|i| {
            (
                i.path.base_name().to_owned(),
                i.nar_hash,
                i.nar_size,
                i.references.clone(),
            )
        })
        .collect()
}

#[test]
fn generation_is_deterministic_and_seeded() {
    let s = spec(WorkloadKind::Mixed, 7, 12, 1 << 10, 300 << 10);
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let wa = prepare(a.path(), &s).unwrap();
    let wb = prepare(b.path(), &s).unwrap();
    assert!(wa.generated && wb.generated);
    assert_eq!(hashes(&wa.workload), hashes(&wb.workload));
    let other = WorkloadSpec {
        seed: 8,
        ..s.clone()
    };
    let wc = prepare(c.path(), &other).unwrap();
    let (ha, hc) = (hashes(&wa.workload), hashes(&wc.workload));
    assert!(
        ha.iter().zip(&hc).all(|(x, y)| x.1 != y.1),
        "another seed, other NARs"
    );
    // References point only at earlier paths (or the path itself).
    for (i, info) in wa.workload.infos.iter().enumerate() {
        for r in &info.references {
            let j = wa.workload.infos.iter().position(|x| &x.path == r).unwrap();
            assert!(j <= i, "{} refers to a later path", info.path);
        }
    }
}

#[test]
fn manifest_hashes_match_the_tree_and_a_cached_workload_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(WorkloadKind::Large, 3, 1, 3 << 20, 3 << 20);
    let first = prepare(dir.path(), &s).unwrap();
    for info in &first.workload.infos {
        let full = info.path.to_absolute(&first.workload.store_dir);
        assert_eq!(
            hash_path(Path::new(&full)).unwrap(),
            (info.nar_hash, info.nar_size)
        );
    }
    let again = prepare(dir.path(), &s).unwrap();
    assert!(!again.generated, "the cached workload is reused");
    assert_eq!(hashes(&first.workload), hashes(&again.workload));
    // A damaged tree is noticed by the warm-up read and generated again.
    let store = Path::new(&first.workload.store_dir);
    let victim = fs::read_dir(store).unwrap().next().unwrap().unwrap().path();
    fs::write(victim.join("share/extra"), b"x").unwrap();
    let repaired = prepare(dir.path(), &s).unwrap();
    assert!(repaired.generated);
    assert_eq!(hashes(&first.workload), hashes(&repaired.workload));
}

#[test]
fn large_tree_looks_like_a_package_and_compresses_like_one() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(WorkloadKind::Large, 1, 1, 24 << 20, 24 << 20);
    let w = prepare(dir.path(), &s).unwrap().workload;
    let root = PathBuf::from(w.infos[0].path.to_absolute(&w.store_dir));
    let (mut files, mut links, mut execs, mut dirs, mut smallest, mut largest) =
        (0, 0, 0, 0, u64::MAX, 0);
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                dirs += 1;
                stack.push(e.path());
            } else if m.file_type().is_symlink() {
                links += 1;
            } else {
                use std::os::unix::fs::PermissionsExt;
                files += 1;
                execs += usize::from(m.permissions().mode() & 0o100 != 0);
                smallest = smallest.min(m.len());
                largest = largest.max(m.len());
            }
        }
    }
    assert!(
        files > 20 && links > 3 && execs > 3 && dirs > 8,
        "{files} {links} {execs} {dirs}"
    );
    assert!(
        smallest < 1024 && largest > 1 << 20,
        "{smallest}..{largest}"
    );
    let c = measure_ceiling(&w, CompressionSettings::default(), 4 << 20, 2, 64 << 20, 1).unwrap();
    let ratio = c.sample_bytes as f64 / c.compressed_bytes as f64;
    assert!((2.3..=4.5).contains(&ratio), "zstd-3 ratio {ratio:.2}");
    assert_eq!(
        c.sample_bytes,
        w.nar_bytes(),
        "under the limit everything is sampled"
    );
}

#[test]
fn ceiling_samples_evenly_under_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(WorkloadKind::Large, 1, 1, 2 << 20, 2 << 20);
    let w = prepare(dir.path(), &s).unwrap().workload;
    let c = measure_ceiling(&w, CompressionSettings::default(), 256 << 10, 1, 1 << 20, 1).unwrap();
    assert!(
        c.sample_bytes <= 1 << 20 && c.sample_bytes >= 512 << 10,
        "{}",
        c.sample_bytes
    );
    assert!((2..=4).contains(&c.chunks), "{}", c.chunks);
}

#[test]
fn a_small_workload_runs_through_the_real_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(WorkloadKind::ManySmall, 1, 40, 1 << 10, 7 << 10);
    let w = prepare(dir.path(), &s).unwrap().workload;
    let mut opts = PushOptions::new(CompressionSettings::default(), vec![bench_key()]);
    opts.jobs = 2;
    // Straight into a NullCache: what the report counts is what the sink received.
    let cache = NullCache::new();
    let report = pipeline::upload(&cache, &w.store_dir, &w.infos, &opts, &NoProgress).unwrap();
    assert_eq!(
        report.count(|o| matches!(o, Outcome::Uploaded { .. })),
        40,
        "{:?}",
        report.failed().next()
    );
    assert_eq!(report.bytes.nar, w.nar_bytes());
    assert_eq!(report.bytes.file, cache.nar_bytes());
    assert_eq!(cache.narinfos(), 40);
    // And through run_once, both sinks.
    for sink in [
        Sink::Null,
        Sink::File {
            parent: dir.path().join("caches"),
        },
    ] {
        let run = run_once(&w, &sink, &opts, false).unwrap();
        check_run(&w, sink.kind(), &run).unwrap();
        assert_eq!(
            (run.paths, run.uploaded, run.nar_bytes),
            (40, 40, w.nar_bytes())
        );
        assert!(
            run.file_bytes > 0 && run.file_bytes < run.nar_bytes,
            "{run:?}"
        );
        let names: Vec<&str> = run.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["walk", "hash", "compress", "sink"]);
        assert!(
            run.stages
                .iter()
                .all(|s| s.utilisation >= 0.0 && s.bytes_in > 0)
        );
        let r = summarise(&w, sink.kind(), &[run.clone(), run.clone(), run], None);
        assert_eq!(r.runs, 3);
        assert!(r.mb_per_s > 0.0 && r.paths_per_s > 0.0);
    }
    // The file sink's directories are removed after each run.
    assert_eq!(fs::read_dir(dir.path().join("caches")).unwrap().count(), 0);
}

fn fake_result(workload: &str, sink: &str, mb_per_s: f64, rss: u64) -> BenchResult {
    BenchResult {
        workload: workload.into(),
        sink: sink.into(),
        spec: WorkloadSpec::default_for(WorkloadKind::parse(workload).unwrap(), 1, 1 << 30),
        paths: 100,
        nar_bytes: 1_000_000_000,
        file_bytes: 300_000_000,
        compression_ratio: 3.3,
        runs: 3,
        seconds: 1000.0 / mb_per_s,
        seconds_all: vec![],
        mb_per_s,
        paths_per_s: 100.0 * mb_per_s / 1000.0,
        cpu_seconds: None,
        cpu_seconds_per_gb: None,
        cpu_cores_used: None,
        peak_rss_bytes: Some(rss),
        rss_start_bytes: None,
        stages: vec![],
        bottleneck: None,
        bottleneck_utilisation: None,
        ceiling_mb_per_s: None,
        pct_of_ceiling: None,
        cpu_pct_of_ceiling: None,
    }
}

fn fake_report(results: Vec<BenchResult>) -> BenchReport {
    BenchReport {
        version: REPORT_VERSION,
        machine: Machine::detect(),
        settings: Settings {
            compression: "zstd".into(),
            level: 3,
            jobs: 2,
            memory_bytes: 64 << 20,
            chunk_size: 4 << 20,
            seed: 1,
            signed: true,
            rss_method: RssMethod::ClearRefs,
            page_cache: "warm".into(),
            statistic: "median".into(),
            ceiling_sample_limit_bytes: CEILING_SAMPLE_LIMIT,
            mb: "1e6 bytes".into(),
        },
        results,
        ceilings: vec![],
        baseline: None,
    }
}

#[test]
fn baseline_comparison_flags_regressions() {
    let f = Path::new("base.json");
    let base = fake_report(vec![fake_result("large", "null", 500.0, 80 << 20)]);
    // 20% slower fails at 10%.
    let slower = fake_report(vec![fake_result("large", "null", 400.0, 80 << 20)]);
    let s = compare(f, &base, &slower, 10.0).unwrap();
    assert_eq!(s.regressions, 2, "MB/s and paths/s: {s:?}");
    assert!(render_comparisons(&s).contains("REGRESSION (20.0% worse > 10%)"));
    // Faster passes.
    let faster = fake_report(vec![fake_result("large", "null", 600.0, 80 << 20)]);
    assert_eq!(compare(f, &base, &faster, 10.0).unwrap().regressions, 0);
    // 5% slower passes at 10%.
    let noise = fake_report(vec![fake_result("large", "null", 475.0, 80 << 20)]);
    assert_eq!(compare(f, &base, &noise, 10.0).unwrap().regressions, 0);
    // RSS growth is flagged; a tiny one is not.
    let fat = fake_report(vec![fake_result("large", "null", 500.0, 120 << 20)]);
    let s = compare(f, &base, &fat, 10.0).unwrap();
    assert_eq!(s.regressions, 1);
    assert!(
        s.comparisons
            .iter()
            .any(|c| c.metric == "peak_rss_bytes" && c.regressed)
    );
    let small_base = fake_report(vec![fake_result("many-small", "file", 50.0, 10 << 20)]);
    let small_now = fake_report(vec![fake_result("many-small", "file", 50.0, 12 << 20)]);
    assert_eq!(
        compare(f, &small_base, &small_now, 10.0)
            .unwrap()
            .regressions,
        0
    );
}

#[test]
fn baselines_that_cannot_be_compared_are_refused_naming_the_file() {
    let f = Path::new("/ci/base.json");
    let base = fake_report(vec![fake_result("large", "null", 500.0, 80 << 20)]);
    let mut other_level = fake_report(vec![fake_result("large", "null", 500.0, 80 << 20)]);
    other_level.settings.level = 19;
    let e = compare(f, &base, &other_level, 10.0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/ci/base.json") && e.contains("zstd-3") && e.contains("zstd-19"),
        "{e}"
    );
    let mut bigger = fake_result("large", "null", 500.0, 80 << 20);
    bigger.spec.max_path_bytes = 4 << 30;
    let e = compare(f, &base, &fake_report(vec![bigger]), 10.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not comparable"), "{e}");
    let e = compare(
        f,
        &base,
        &fake_report(vec![fake_result("mixed", "file", 1.0, 1)]),
        10.0,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no result in common"), "{e}");
    // Files: unreadable, not JSON, another version.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json");
    assert!(
        read_baseline(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing.json")
    );
    let junk = dir.path().join("junk.json");
    fs::write(&junk, "{").unwrap();
    assert!(
        read_baseline(&junk)
            .unwrap_err()
            .to_string()
            .contains("not a JSON bench report")
    );
    fs::write(&junk, r#"{"version": 99}"#).unwrap();
    assert!(
        read_baseline(&junk)
            .unwrap_err()
            .to_string()
            .contains("report version 99")
    );
    // A report round-trips through its JSON.
    let good = dir.path().join("good.json");
    fs::write(&good, serde_json::to_vec(&base).unwrap()).unwrap();
    assert_eq!(read_baseline(&good).unwrap(), base);
}

#[test]
fn rng_helpers_stay_in_range() {
    let mut r = Rng::new(5);
    for _ in 0..10_000 {
        let v = r.log_uniform(1 << 10, 20 << 20);
        assert!((1 << 10..=20 << 20).contains(&v));
        let c = r.closure_size(1 << 10, 20 << 20);
        assert!((1 << 10..=20 << 20).contains(&c));
        assert!(r.range(3, 9) <= 9 && r.range(3, 9) >= 3);
        assert!(r.skewed(10) < 10);
    }
    assert_eq!(r.log_uniform(5, 5), 5);
}

#[test]
fn peak_rss_and_cpu_time_can_be_read() {
    assert!(status_bytes("VmHWM").unwrap_or(1) > 0);
    let before = process_cpu_seconds().unwrap();
    let mut x = 0u64;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(60) {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
    }
    assert!(process_cpu_seconds().unwrap() > before, "{x}");
    assert_ne!(RssMethod::detect(), RssMethod::Unavailable);
}
