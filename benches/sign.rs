//! Per-path metadata work: ed25519 signing and verifying of a fingerprint, and rendering
//! and parsing a narinfo. Each runs once per uploaded path, so it matters for closures of
//! thousands of small paths. Realistic sizes: a toolchain-like path with 12 references,
//! a deriver and two signatures (the store's and ours).
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use narflow::format::hash::Sha256;
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::SigningKey;
use narflow::format::store_path::DEFAULT_STORE_DIR;
use std::hint::black_box;

mod common;

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

fn narinfo() -> NarInfo {
    let nar_hash = Sha256::digest(b"nar");
    let file_hash = Sha256::digest(b"file");
    NarInfo {
        store_path: common::store_path("rustc-1.95.0"),
        url: format!("nar/{}.nar.zst", file_hash.to_nix32()),
        compression: "zstd".to_owned(),
        file_hash: Some(file_hash),
        file_size: Some(312_459_102),
        nar_hash,
        nar_size: 1_176_214_232,
        references: {
            let mut r: Vec<_> = REFERENCES.iter().map(|n| common::store_path(n)).collect();
            r.sort();
            r
        },
        deriver: Some(common::store_path("rustc-1.95.0.drv")),
        sigs: vec![],
        ca: None,
    }
}

fn sign(c: &mut Criterion) {
    let sd = DEFAULT_STORE_DIR;
    let key = SigningKey::from_seed("cache.example.org-1", [7; 32]);
    let store_key = SigningKey::from_seed("cache.nixos.org-1", [9; 32]);
    let mut info = narinfo();
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
