//! Hashing 4 MiB: SHA-256 (NarHash and FileHash, computed over every NAR and every
//! compressed file) and blake3 (what the design names upload parts by).
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use narflow::format::hash::{HashingWriter, Sha256};
use std::hint::black_box;
use std::io::Write;

mod common;

fn hash(c: &mut Criterion) {
    let data = common::mixed_bytes(common::scaled(4 << 20, 64 << 10), 4);
    let mut group = c.benchmark_group("hash");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("sha256", |b| b.iter(|| Sha256::digest(black_box(&data))));
    // As the pipeline hashes a NAR: through a HashingWriter, in the NAR writer's 256 KiB
    // writes.
    group.bench_function("sha256/hashing_writer", |b| {
        b.iter(|| {
            let mut w = HashingWriter::new(std::io::sink());
            for part in black_box(&data).chunks(256 << 10) {
                w.write_all(part).unwrap();
            }
            w.finish()
        });
    });
    group.bench_function("blake3", |b| b.iter(|| blake3::hash(black_box(&data))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = hash
}
criterion_main!(benches);
