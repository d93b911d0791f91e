//! The whole push pipeline (`pipeline::upload`: walk → NAR + NarHash → chunk → zstd-3 →
//! FileHash → sink → signed narinfos) into a NullCache, so the destination costs nothing
//! and the number is narflow's own. Two shapes: one 64 MiB path (chunk-parallel
//! compression) and 500 small paths (per-path latency hidden by concurrency). Default
//! options: one compression thread per core, 64 MiB budget, 4 MiB chunks.
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use narflow::cache::null::NullCache;
use narflow::format::compression::CompressionSettings;
use narflow::format::signing::SigningKey;
use narflow::pipeline::outcome::{NoProgress, Outcome};
use narflow::pipeline::{PushOptions, upload};
use narflow::store::PathInfo;

mod common;

fn run(store_dir: &str, infos: &[PathInfo], opts: &PushOptions) {
    let cache = NullCache::new();
    let report = upload(&cache, store_dir, infos, opts, &NoProgress).unwrap();
    assert_eq!(
        report.count(|o| matches!(o, Outcome::Uploaded { .. })),
        infos.len(),
        "{:?}",
        report.failed().next()
    );
}

fn pipeline(c: &mut Criterion) {
    let store = common::tempdir();
    let sd = store.path().to_str().unwrap();
    let large_tree = common::large_files_tree(
        &common::scaled(vec![40 << 20, 16 << 20, 8 << 20], vec![1 << 20]),
        5,
    );
    let large = vec![common::add_to_store(
        store.path(),
        "large-1.0",
        &large_tree,
        vec![],
    )];
    let small = common::small_store(store.path(), common::scaled(500, 20), 6);
    let key = SigningKey::from_seed("bench-1", [7; 32]);
    let opts = PushOptions::new(CompressionSettings::default(), vec![key]);

    let mut group = c.benchmark_group("pipeline");
    common::slow(&mut group, 8);
    for (name, infos) in [("one_large_path", &large), ("500_small_paths", &small)] {
        group.throughput(Throughput::Bytes(infos.iter().map(|i| i.nar_size).sum()));
        group.bench_function(name, |b| b.iter(|| run(sd, infos, &opts)));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = pipeline
}
criterion_main!(benches);
