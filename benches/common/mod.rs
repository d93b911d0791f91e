//! Workloads shared by the criterion benches: deterministic, store-shaped data (mixed
//! chunks, file trees, synthetic store paths with their NarHash) and one criterion
//! configuration.
//!
//! Everything is generated from fixed seeds, so two commits benchmark the same bytes and
//! `scripts/bench-compare` compares like with like. Under `cargo test` (criterion's test
//! mode, one iteration per bench) the workloads shrink: the benches are only checked to
//! run, and CI must stay fast.

// Each bench target includes this module and uses only part of it.
#![allow(dead_code)]

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use narflow::format::hash::Sha256;
use narflow::format::nar::Node;
use narflow::format::narinfo::NarInfo;
use narflow::format::store_path::StorePath;
use narflow::store::PathInfo;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// True when run by `cargo bench` (criterion gets `--bench`), false under `cargo test`.
pub fn benchmarking() -> bool {
    let has = |flag: &str| std::env::args().skip(1).any(|a| a == flag);
    has("--bench") && !has("--test")
}

/// `full` when benchmarking, `test` under `cargo test`.
pub fn scaled<T>(full: T, test: T) -> T {
    if benchmarking() { full } else { test }
}

/// The configuration of every bench: few samples and short measurements, so `cargo bench`
/// of everything takes a few minutes on two cores. The noise this leaves is a few percent,
/// below the 10% that `scripts/bench-compare` flags by default.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .without_plots()
}

/// For benches whose one iteration takes 100 ms or more: 10 samples of flat sampling (the
/// same iteration count in every sample) in `seconds`, at least 10 iterations in all.
pub fn slow(group: &mut BenchmarkGroup<'_, WallTime>, seconds: u64) {
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(seconds));
}

/// A temporary directory for trees and synthetic stores, on tmpfs (`/dev/shm`) when there
/// is one: creating and deleting thousands of files on a disk file system can take longer
/// than the benches themselves, and reads of a warm store come from memory either way.
pub fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    shm.is_dir()
        .then(|| tempfile::tempdir_in(shm).ok())
        .flatten()
        .unwrap_or_else(|| tempfile::tempdir().unwrap())
}

/// splitmix64: tiny, fast, and the same bytes on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi` (`hi > lo`); the modulo bias is irrelevant here.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo) as u64) as usize
    }
    /// Log-uniform in `lo..hi`: many small values, a few large ones, as file sizes are.
    pub fn log_range(&mut self, lo: usize, hi: usize) -> usize {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        let x = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((a + (b - a) * x).exp() as usize).clamp(lo, hi - 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
    pub fn fill(&mut self, out: &mut Vec<u8>, len: usize) {
        let end = out.len() + len;
        while out.len() < end {
            let word = self.next_u64().to_le_bytes();
            out.extend_from_slice(&word[..(end - out.len()).min(8)]);
        }
    }
}

/// Syllables the text-like regions are made of: words repeat, as in scripts, headers,
/// documentation and symbol tables.
const SYLLABLES: [&str; 24] = [
    "lib", "nix", "store", "con", "fig", "ure", "make", "in", "stall", "share", "doc", "bin",
    "gcc", "rust", "std", "core", "alloc", "fn", "let", "pub", "mod", "use", "impl", "test",
];

/// Appends `len` bytes of text: words, paths, punctuation and newlines.
fn text(rng: &mut Rng, out: &mut Vec<u8>, len: usize) {
    let end = out.len() + len;
    while out.len() < end {
        match rng.range(0, 20) {
            0 => out.extend_from_slice(b"/nix/store/"),
            1 => out.push(b'\n'),
            2 => out.extend_from_slice(b"(); "),
            3..=5 => out.extend_from_slice(format!("{}", rng.range(0, 4096)).as_bytes()),
            _ => {
                for _ in 0..rng.range(1, 4) {
                    out.extend_from_slice(SYLLABLES[rng.range(0, SYLLABLES.len())].as_bytes());
                }
                out.push(if rng.chance(15) { b'_' } else { b' ' });
            }
        }
    }
    out.truncate(end);
}

/// Appends `len` bytes shaped like machine code: a skewed set of opcodes, small
/// immediates, and 32-bit offsets whose high bytes are mostly zero.
fn code(rng: &mut Rng, out: &mut Vec<u8>, len: usize) {
    const OPCODES: [u8; 12] = [
        0x48, 0x89, 0x8b, 0xe8, 0x0f, 0x85, 0x74, 0xc3, 0x41, 0x4c, 0x83, 0xff,
    ];
    let end = out.len() + len;
    while out.len() < end {
        let op = OPCODES[rng.range(0, 4) * rng.range(1, 4)];
        out.push(op);
        match rng.range(0, 4) {
            0 => out.push(rng.range(0, 16) as u8),
            1 => out.extend_from_slice(&(rng.range(0, 1 << 16) as u32).to_le_bytes()),
            2 => out.extend_from_slice(&[0xc0 | rng.range(0, 8) as u8, 0x08]),
            _ => {}
        }
    }
    out.truncate(end);
}

/// `len` bytes that compress like real store contents: regions of 16–256 KiB of text-like
/// (~35%), code-like (~35%), random (~15%, already-compressed data) and zero (~15%,
/// padding and sparse sections) bytes. Deterministic in `seed`.
pub fn mixed_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let region = rng.log_range(16 << 10, 256 << 10).min(len - out.len());
        match rng.range(0, 20) {
            0..=6 => text(&mut rng, &mut out, region),
            7..=13 => code(&mut rng, &mut out, region),
            14..=16 => rng.fill(&mut out, region),
            _ => out.resize(out.len() + region, 0),
        }
    }
    out
}

/// Small file contents: one kind per file (scripts and headers are text, objects code).
fn small_contents(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    match rng.range(0, 10) {
        0..=5 => text(rng, &mut out, len),
        6..=8 => code(rng, &mut out, len),
        _ => rng.fill(&mut out, len),
    }
    out
}

/// A package-like tree of `files` small files (64 B–32 KiB, log-distributed) in nested
/// directories, with some executables and symlinks.
pub fn small_files_tree(files: usize, seed: u64) -> Node {
    let mut rng = Rng::new(seed);
    let mut root = BTreeMap::new();
    for i in 0..files {
        let depth = rng.range(1, 4);
        let mut dir = &mut root;
        for _ in 0..depth {
            let name = format!("{}{}", SYLLABLES[rng.range(0, 8)], rng.range(0, 6)).into_bytes();
            let entry = dir
                .entry(name)
                .or_insert_with(|| Node::Directory(BTreeMap::new()));
            match entry {
                Node::Directory(d) => dir = d,
                _ => unreachable!("directory names and file names never collide"),
            }
        }
        let name = format!("f{i}.{}", SYLLABLES[rng.range(0, SYLLABLES.len())]).into_bytes();
        let node = if rng.chance(5) {
            Node::Symlink {
                target: format!("../{}/f{}", SYLLABLES[rng.range(0, 8)], rng.range(0, files))
                    .into_bytes(),
            }
        } else {
            let len = rng.log_range(64, 32 << 10);
            Node::Regular {
                executable: rng.chance(10),
                contents: small_contents(&mut rng, len),
            }
        };
        dir.insert(name, node);
    }
    Node::Directory(root)
}

/// A tree of a few large files (shared libraries, archives) of `sizes` bytes each.
pub fn large_files_tree(sizes: &[usize], seed: u64) -> Node {
    let root = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let file = Node::Regular {
                executable: i == 0,
                contents: mixed_bytes(len, seed + i as u64),
            };
            (format!("lib{i}.so").into_bytes(), file)
        })
        .collect();
    Node::Directory(root)
}

/// NAR size of `node`.
pub fn nar_size(node: &Node) -> u64 {
    narflow::format::nar::writer::write_node(node, &mut std::io::sink()).unwrap()
}

/// A store path name with a valid hash part derived from `name`.
pub fn store_path(name: &str) -> StorePath {
    let hash = narflow::format::nix32::encode(&Sha256::digest(name.as_bytes()).0[..20]);
    StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
}

/// Materializes `node` as store path `name` under `store_dir` and returns its path info,
/// with the NarHash and NarSize read back from disk, as the Nix database would have them.
pub fn add_to_store(
    store_dir: &Path,
    name: &str,
    node: &Node,
    references: Vec<StorePath>,
) -> PathInfo {
    let path = store_path(name);
    let full = store_dir.join(path.base_name());
    narflow::nar_fs::restore(node, &full).unwrap();
    PathInfo::of_tree(path, &full, references, None).unwrap()
}

/// `paths` small store paths of 1–5 files each (64 B–32 KiB), each referring to up to
/// three earlier ones: the shape of most of a closure (scripts, configs, small libraries).
/// Returned references first, as the pipeline expects.
pub fn small_store(store_dir: &Path, paths: usize, seed: u64) -> Vec<PathInfo> {
    let mut rng = Rng::new(seed);
    let mut infos: Vec<PathInfo> = Vec::with_capacity(paths);
    for i in 0..paths {
        let tree = small_files_tree(rng.range(1, 6), seed ^ (i as u64 + 1));
        let refs = (0..rng.range(0, 4).min(i))
            .map(|_| infos[rng.range(0, i)].path.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        infos.push(add_to_store(store_dir, &format!("small-{i}"), &tree, refs));
    }
    infos
}

const REFERENCES: [&str; 12] = [
    "glibc-2.40-66",
    "gcc-14.3.0-lib",
    "zlib-1.3.1",
    "openssl-3.4.1",
    "libxml2-2.13.8",
    "ncurses-6.5",
    "bash-5.2p37",
    "coreutils-9.7",
    "curl-8.14.1",
    "libssh2-1.11.1",
    "xz-5.8.1",
    "rustc-1.95.0",
];

/// A narinfo of realistic size: a toolchain-like path with 12 references and a deriver,
/// unsigned.
pub fn sample_narinfo() -> NarInfo {
    let nar_hash = Sha256::digest(b"nar");
    let file_hash = Sha256::digest(b"file");
    NarInfo {
        store_path: store_path("rustc-1.95.0"),
        url: format!("nar/{}.nar.zst", file_hash.to_nix32()),
        compression: "zstd".to_owned(),
        file_hash: Some(file_hash),
        file_size: Some(312_459_102),
        nar_hash,
        nar_size: 1_176_214_232,
        references: {
            let mut r: Vec<_> = REFERENCES.iter().map(|n| store_path(n)).collect();
            r.sort();
            r
        },
        deriver: Some(store_path("rustc-1.95.0.drv")),
        sigs: vec![],
        ca: None,
    }
}
