//! Compressing one pipeline chunk (`compress_chunk`, one independent zstd frame or xz
//! stream) of 4 MiB of store-like data, at the levels users pick: zstd 1, 3 (default) and
//! 9, and xz 6 (Nix's default for binary caches; slow, so at one level only).
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use narflow::format::compression::{Compression, CompressionSettings};
use narflow::memory::DEFAULT_CHUNK_SIZE;
use narflow::pipeline::compress::compress_chunk;
use std::hint::black_box;

mod common;

fn compress(c: &mut Criterion) {
    let chunk = common::mixed_bytes(common::scaled(DEFAULT_CHUNK_SIZE, 64 << 10), 3);
    let mut group = c.benchmark_group("compress");
    // zstd 3 takes ~30 ms a chunk on a slow core: 20 linear samples need ~6 s.
    group.measurement_time(std::time::Duration::from_secs(6));
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    for (kind, level) in [
        (Compression::Zstd, 1),
        (Compression::Zstd, 3),
        (Compression::Zstd, 9),
        (Compression::Xz, 6),
    ] {
        let settings = CompressionSettings::new(kind, Some(level)).unwrap();
        if kind == Compression::Xz {
            // About 2 s a chunk: the ten iterations that make ten samples.
            common::slow(&mut group, 25);
        }
        group.bench_function(format!("{}-{level}", kind.nix_name()), |b| {
            b.iter(|| compress_chunk(settings, black_box(&chunk)).unwrap());
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = compress
}
criterion_main!(benches);
