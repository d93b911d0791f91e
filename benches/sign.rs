//! Per-path metadata work: ed25519 signing and verifying of a fingerprint, and rendering
//! and parsing a narinfo. Each runs once per uploaded path, so it matters for closures of
//! thousands of small paths. Realistic sizes: a toolchain-like path with 12 references,
//! a deriver and two signatures (the store's and ours).
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::SigningKey;
use narflow::format::store_path::DEFAULT_STORE_DIR;
use std::hint::black_box;

mod common;

fn sign(c: &mut Criterion) {
    let sd = DEFAULT_STORE_DIR;
    let key = SigningKey::from_seed("cache.example.org-1", [7; 32]);
    let store_key = SigningKey::from_seed("cache.nixos.org-1", [9; 32]);
    let mut info = common::sample_narinfo();
    info.sign(&store_key, sd);
    let fingerprint = info.fingerprint(sd);
    let public = key.verifying_key();
    let sig = key.sign(&fingerprint);
    info.sign(&key, sd);
    let text = info.render(sd);
    assert_eq!(NarInfo::parse(&text, sd).unwrap(), info);

    let mut group = c.benchmark_group("sign");
    group.throughput(Throughput::Bytes(fingerprint.len() as u64));
    group.bench_function("ed25519_sign", |b| {
        b.iter(|| key.sign(black_box(&fingerprint)));
    });
    group.bench_function("ed25519_verify", |b| {
        b.iter(|| assert!(public.verify(black_box(&fingerprint), black_box(&sig))));
    });
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("narinfo_render", |b| {
        b.iter(|| black_box(&info).render(sd));
    });
    group.bench_function("narinfo_parse", |b| {
        b.iter(|| NarInfo::parse(black_box(&text), sd).unwrap());
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = sign
}
criterion_main!(benches);
