//! NAR writing, the hot path every uploaded byte goes through: `dump_path` of trees on disk
//! (per-file overhead with many small files; read/write throughput with a few large ones)
//! and `write_node` of an in-memory tree (the encoder alone, no file system).
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use narflow::format::nar::writer::write_node;
use narflow::nar_fs::{dump_path, restore};
use std::hint::black_box;
use std::io;

mod common;

fn nar_write(c: &mut Criterion) {
    let dir = common::tempdir();
    let small = common::small_files_tree(common::scaled(3000, 50), 1);
    let large = common::large_files_tree(
        &common::scaled(vec![32 << 20, 16 << 20, 8 << 20], vec![256 << 10]),
        2,
    );
    let mut group = c.benchmark_group("nar_write");
    for (name, tree) in [("small_files", &small), ("large_files", &large)] {
        let path = dir.path().join(name);
        restore(tree, &path).unwrap();
        let size = common::nar_size(tree);
        // Same bytes from disk as from memory, or the two benches measure different things.
        assert_eq!(dump_path(&path, &mut io::sink()).unwrap(), size);
        group.throughput(Throughput::Bytes(size));
        group.bench_function(format!("dump_path/{name}"), |b| {
            b.iter(|| dump_path(black_box(&path), &mut io::sink()).unwrap());
        });
    }
    group.throughput(Throughput::Bytes(common::nar_size(&small)));
    group.bench_function("write_node/small_files", |b| {
        b.iter(|| write_node(black_box(&small), &mut io::sink()).unwrap());
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = nar_write
}
criterion_main!(benches);
