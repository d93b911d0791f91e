//! Instruction counts of the hot paths, measured by gungraun under Valgrind's Callgrind:
//! the numbers `scripts/perf-guard` compares with `benches/perf-baseline.json` in CI.
//!
//! Every benchmark is a separate Callgrind run of this binary. Its setup (generating the
//! input, writing temporary trees, building options) runs before the measured function
//! and its teardown (dropping them) after; only the measured function is counted, and in
//! the pipeline benchmarks every thread it starts. Inputs are fixed: seeded workloads
//! from `narflow::bench`, fixed-length temporary paths under `/tmp`, a fixed thread
//! count. Nothing measured may depend on the machine beyond what Valgrind shows the
//! program (its own fixed CPU model for a class of hosts; see `scripts/perf-guard`).
use gungraun::{
    Callgrind, EntryPoint, LibraryBenchmarkConfig, library_benchmark, library_benchmark_group, main,
};
use narflow::bench::{DEFAULT_SEED, WorkloadKind, WorkloadSpec, bench_key, prepare};
use narflow::cache::null::NullCache;
use narflow::format::compression::{Compression, CompressionSettings};
use narflow::format::hash::{HashingWriter, Sha256};
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::{Signature, SigningKey};
use narflow::format::store_path::DEFAULT_STORE_DIR;
use narflow::memory::DEFAULT_CHUNK_SIZE;
use narflow::nar_fs::dump_path;
use narflow::pipeline::compress::compress_chunk;
use narflow::pipeline::outcome::{NoProgress, Outcome};
use narflow::pipeline::{PushOptions, upload};
use narflow::store::PathInfo;
use std::hint::black_box;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

mod common;

/// Size of the one large store path and of the one large file.
const LARGE: u64 = 16 << 20;

/// Small store paths in the pipeline benchmark (and the small-files tree).
const SMALL_PATHS: usize = 200;

/// Compression threads of the pipeline benchmarks: fixed, not one per core, so the counts
/// do not depend on the machine.
const JOBS: usize = 2;

/// A temporary directory whose path has the same length on every run and machine.
fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("narflow-perf-")
        .rand_bytes(8)
        .tempdir_in("/tmp")
        .expect("a temporary directory under /tmp")
}

/// A generated workload and the directory that holds it (removed in the teardown).
struct Store {
    _dir: TempDir,
    store_dir: String,
    infos: Vec<PathInfo>,
}

fn store(kind: WorkloadKind, paths: usize) -> Store {
    let dir = tempdir();
    let mut spec = WorkloadSpec::default_for(kind, DEFAULT_SEED, LARGE);
    spec.paths = paths;
    let w = prepare(dir.path(), &spec).expect("workload").workload;
    Store {
        _dir: dir,
        store_dir: w.store_dir,
        infos: w.infos,
    }
}

fn small_store() -> Store {
    store(WorkloadKind::ManySmall, SMALL_PATHS)
}

fn large_store() -> Store {
    store(WorkloadKind::Large, 1)
}

/// Deterministic bytes whose content does not matter to what is measured (NAR framing
/// and SHA-256 cost the same for any bytes of a given length).
fn plain_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 % 251) as u8).collect()
}

/// One file of [`LARGE`] bytes in a temporary directory.
fn large_file() -> (TempDir, PathBuf) {
    let dir = tempdir();
    let path = dir.path().join("large");
    std::fs::write(&path, plain_bytes(LARGE as usize)).expect("write the large file");
    (dir, path)
}

/// The first pipeline chunk of the large store path's NAR: what one compression worker
/// is given.
fn first_chunk() -> Vec<u8> {
    let s = large_store();
    let path = Path::new(&s.store_dir).join(s.infos[0].path.base_name());
    let mut nar = Vec::new();
    dump_path(&path, &mut nar).expect("dump the large path");
    nar.truncate(DEFAULT_CHUNK_SIZE);
    nar
}

#[library_benchmark]
#[bench::small_files(setup = small_store, teardown = drop)]
fn nar_small_files(s: Store) -> Store {
    black_box(dump_path(Path::new(&s.store_dir), &mut io::sink()).unwrap());
    s
}

#[library_benchmark]
#[bench::one_large_file(setup = large_file, teardown = drop)]
fn nar_large_file(file: (TempDir, PathBuf)) -> (TempDir, PathBuf) {
    black_box(dump_path(&file.1, &mut io::sink()).unwrap());
    file
}

library_benchmark_group!(name = nar, benchmarks = [nar_small_files, nar_large_file]);

/// The first 256 KiB of [`first_chunk`].
fn first_chunk_start() -> Vec<u8> {
    let mut chunk = first_chunk();
    chunk.truncate(256 << 10);
    chunk
}

#[library_benchmark]
#[bench::zstd_3(setup = first_chunk)]
fn compress_zstd(chunk: Vec<u8>) -> Vec<u8> {
    let settings = CompressionSettings::new(Compression::Zstd, None).unwrap();
    compress_chunk(settings, black_box(&chunk)).unwrap()
}

// xz is about a hundred times slower than zstd: a quarter of a megabyte keeps this bench
// to seconds under Valgrind.
#[library_benchmark]
#[bench::xz_6_256kib(setup = first_chunk_start)]
fn compress_xz(chunk: Vec<u8>) -> Vec<u8> {
    let settings = CompressionSettings::new(Compression::Xz, Some(6)).unwrap();
    compress_chunk(settings, black_box(&chunk)).unwrap()
}

library_benchmark_group!(name = compress, benchmarks = [compress_zstd, compress_xz]);

// SHA-256 as the pipeline hashes a NAR or a compressed file: through a writer, in the
// NAR writer's 256 KiB writes.
#[library_benchmark]
#[bench::sha256_4mib(setup = plain_bytes, args = (DEFAULT_CHUNK_SIZE,))]
fn sha256(data: Vec<u8>) -> Sha256 {
    let mut w = HashingWriter::new(io::sink());
    for part in black_box(&data).chunks(256 << 10) {
        w.write_all(part).unwrap();
    }
    w.finish().1
}

library_benchmark_group!(name = hash, benchmarks = [sha256]);

/// The sample narinfo signed by the store's key and ours, and its text.
fn signed_narinfo() -> (NarInfo, String) {
    let mut info = common::sample_narinfo();
    info.sign(
        &SigningKey::from_seed("cache.nixos.org-1", [9; 32]),
        DEFAULT_STORE_DIR,
    );
    info.sign(&bench_key(), DEFAULT_STORE_DIR);
    let text = info.render(DEFAULT_STORE_DIR);
    (info, text)
}

#[library_benchmark]
#[bench::signed(setup = signed_narinfo)]
fn narinfo_render(n: (NarInfo, String)) -> String {
    black_box(&n.0).render(DEFAULT_STORE_DIR)
}

#[library_benchmark]
#[bench::signed(setup = signed_narinfo)]
fn narinfo_parse(n: (NarInfo, String)) -> NarInfo {
    NarInfo::parse(black_box(&n.1), DEFAULT_STORE_DIR).unwrap()
}

fn key_and_fingerprint() -> (SigningKey, String) {
    let fingerprint = common::sample_narinfo().fingerprint(DEFAULT_STORE_DIR);
    (bench_key(), fingerprint)
}

// The ed25519 signature of a narinfo's fingerprint.
#[library_benchmark]
#[bench::fingerprint(setup = key_and_fingerprint)]
fn sign(k: (SigningKey, String)) -> Signature {
    k.0.sign(black_box(&k.1))
}

library_benchmark_group!(
    name = narinfo,
    benchmarks = [narinfo_render, narinfo_parse, sign]
);

/// A workload and the push options, made before the counted region: `PushOptions::new`
/// asks the system for its number of cores.
fn push_setup(s: Store) -> (Store, PushOptions) {
    let mut opts = PushOptions::new(CompressionSettings::default(), vec![bench_key()]);
    opts.jobs = JOBS;
    (s, opts)
}

/// The whole push (walk → NAR + NarHash → chunk → zstd → FileHash → sink → signed narinfo)
/// into the null cache, every path uploaded.
fn push(s: &Store, opts: &PushOptions) {
    let cache = NullCache::new();
    let report = upload(&cache, &s.store_dir, &s.infos, opts, &NoProgress).unwrap();
    assert_eq!(
        report.count(|o| matches!(o, Outcome::Uploaded { .. })),
        s.infos.len(),
        "{:?}",
        report.failed().next()
    );
}

#[library_benchmark]
#[bench::small_paths(args = (small_store(),), setup = push_setup, teardown = drop)]
fn pipeline_small_paths(s: (Store, PushOptions)) -> (Store, PushOptions) {
    push(&s.0, &s.1);
    s
}

#[library_benchmark]
#[bench::one_large_path(args = (large_store(),), setup = push_setup, teardown = drop)]
fn pipeline_large_path(s: (Store, PushOptions)) -> (Store, PushOptions) {
    push(&s.0, &s.1);
    s
}

library_benchmark_group!(
    name = pipeline,
    config = LibraryBenchmarkConfig::default()
        .tool(Callgrind::with_args(["--toggle-collect=*::thread_start"])),
    benchmarks = [pipeline_small_paths, pipeline_large_path]
);

main!(
    config = LibraryBenchmarkConfig::default()
        .tool(Callgrind::with_args(["--cache-sim=no"]).entry_point(EntryPoint::Default));
    library_benchmark_groups = nar, compress, hash, narinfo, pipeline
);
