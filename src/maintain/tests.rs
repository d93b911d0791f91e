use super::gc_plan::{GcOptions, MAX_BATCH, Phase, RootReason, Roots, plan};
use super::index::{CacheIndex, HashPart, IndexBuilder, Stat, listing_key, narinfo_key};
use super::roots::{parse_keep_file, parse_root};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const NOW: i64 = 1_000_000;
const DAY: u64 = 86_400;

/// A narinfo of a test cache: its references, its NAR (by number; several may share
/// one), its deriver's log (by number) and its age in seconds.
#[derive(Debug, Clone)]
struct Path {
    refs: Vec<usize>,
    nar: usize,
    log: Option<usize>,
    age: u64,
    listing: bool,
}

/// A test cache: narinfos, and the ages of NARs and logs by number (a NAR or log no
/// narinfo names is an orphan).
#[derive(Debug, Clone)]
struct Cache {
    paths: Vec<Path>,
    nar_ages: Vec<u64>,
    log_ages: Vec<u64>,
}

fn hash(i: usize) -> HashPart {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    h[19] = 0x5a;
    h
}

fn nar_key(n: usize) -> String {
    format!("nar/{n:052}.nar.zst")
}

fn stat(age: u64, size: u64) -> Stat {
    Stat {
        size,
        mtime: NOW - age as i64,
    }
}

impl Cache {
    fn index(&self) -> CacheIndex {
        let mut b = IndexBuilder::default();
        // In reverse, so the builder's own ordering is exercised.
        for (i, p) in self.paths.iter().enumerate().rev() {
            let refs: Vec<HashPart> = p.refs.iter().map(|&r| hash(r)).chain([hash(i)]).collect();
            let drv = p.log.map(|l| format!("{l:032}-x.drv"));
            b.narinfo(
                hash(i),
                stat(p.age, 500),
                &nar_key(p.nar),
                &refs,
                drv.as_deref(),
            );
            if p.listing {
                b.listing(hash(i), stat(p.age, 40));
            }
        }
        for (n, &age) in self.nar_ages.iter().enumerate() {
            b.nar(&nar_key(n), stat(age, 10_000 + n as u64));
        }
        for (l, &age) in self.log_ages.iter().enumerate() {
            b.log(&format!("{l:032}-x.drv"), stat(age, 7));
        }
        b.build()
    }

    /// Every object key, with what each narinfo needs (its references' narinfos, its NAR).
    fn keys(&self) -> BTreeSet<String> {
        let mut k = BTreeSet::new();
        for (i, p) in self.paths.iter().enumerate() {
            k.insert(narinfo_key(&hash(i)));
            if p.listing {
                k.insert(listing_key(&hash(i)));
            }
        }
        k.extend((0..self.nar_ages.len()).map(nar_key));
        k.extend((0..self.log_ages.len()).map(|l| format!("log/{l:032}-x.drv")));
        k
    }

    fn needs(&self, i: usize) -> Vec<String> {
        let p = &self.paths[i];
        p.refs
            .iter()
            .map(|&r| narinfo_key(&hash(r)))
            .chain([nar_key(p.nar)])
            .collect()
    }

    fn closure(&self, roots: &[usize]) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut todo = roots.to_vec();
        while let Some(i) = todo.pop() {
            if seen.insert(i) {
                todo.extend(&self.paths[i].refs);
            }
        }
        seen
    }
}

fn opts(grace: u64) -> GcOptions {
    GcOptions {
        now: NOW,
        grace,
        batch_size: MAX_BATCH,
    }
}

fn keep(paths: &[usize]) -> Roots {
    Roots {
        paths: paths
            .iter()
            .map(|&i| (hash(i), RootReason::Closure))
            .collect(),
        newer_than: None,
    }
}

/// Applies the plan's batches to the cache's keys, checking that each batch can go in any
/// order: no narinfo there before it (its own members included) needs a key in it.
/// Returns the keys left.
fn apply(cache: &Cache, batches: &[super::gc_plan::Batch]) -> BTreeSet<String> {
    let mut keys = cache.keys();
    for (b, batch) in batches.iter().enumerate() {
        assert!(!batch.keys.is_empty() && batch.keys.len() <= MAX_BATCH);
        let gone: BTreeSet<&String> = batch.keys.iter().collect();
        for (i, _) in cache.paths.iter().enumerate() {
            if !keys.contains(&narinfo_key(&hash(i))) {
                continue;
            }
            for need in cache.needs(i) {
                assert!(
                    !gone.contains(&need),
                    "batch {b} deletes {need}, which narinfo {i} (there before it) needs"
                );
            }
        }
        for k in &batch.keys {
            assert!(keys.remove(k), "batch {b} deletes {k}, which is not there");
        }
    }
    keys
}

fn old(refs: &[usize], nar: usize) -> Path {
    Path {
        refs: refs.to_vec(),
        nar,
        log: None,
        age: 10 * DAY,
        listing: false,
    }
}

#[test]
fn a_closure_is_kept_and_the_rest_goes_referrers_first_then_the_nars() {
    // 0 → 1 → 2 is kept; 3 → 1, 4 → 3 → 5 and 6 go, 4 before 3 before 5.
    let cache = Cache {
        paths: vec![
            old(&[1], 0),
            old(&[2], 1),
            old(&[], 2),
            old(&[1, 5], 3),
            old(&[3], 4),
            old(&[], 5),
            old(&[], 6),
        ],
        nar_ages: vec![10 * DAY; 8],
        log_ages: vec![],
    };
    let p = plan(&cache.index(), &keep(&[0]), &opts(DAY));
    let left = apply(&cache, &p.batches);
    let narinfos = |ids: &[usize]| {
        ids.iter()
            .map(|&i| narinfo_key(&hash(i)))
            .collect::<Vec<_>>()
    };
    let phases: Vec<(Phase, Vec<String>)> = p
        .batches
        .iter()
        .map(|b| {
            (
                b.phase,
                b.keys
                    .iter()
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
            )
        })
        .collect();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        phases,
        vec![
            (Phase::Narinfos { layer: 0 }, sorted(narinfos(&[4, 6]))),
            (Phase::Narinfos { layer: 1 }, sorted(narinfos(&[3]))),
            (Phase::Narinfos { layer: 2 }, sorted(narinfos(&[5]))),
            // NAR 7 is an orphan no narinfo names.
            (Phase::Nars, sorted([3, 4, 5, 6, 7].map(nar_key).to_vec())),
        ]
    );
    let expected: BTreeSet<String> = narinfos(&[0, 1, 2])
        .into_iter()
        .chain([0, 1, 2].map(nar_key))
        .collect();
    assert_eq!(left, expected);
    assert_eq!(p.deleted.narinfos.objects, 4);
    assert_eq!(p.deleted.nars.objects, 5);
    assert_eq!(
        p.deleted.nars.bytes,
        (3..=7).map(|n| 10_000 + n).sum::<u64>()
    );
    assert_eq!(p.kept.narinfos.objects, 3);
}

#[test]
fn a_nar_shared_with_a_kept_narinfo_stays() {
    // 1 goes but names the NAR of 0, which is kept.
    let cache = Cache {
        paths: vec![old(&[], 0), old(&[], 0)],
        nar_ages: vec![10 * DAY],
        log_ages: vec![],
    };
    let p = plan(&cache.index(), &keep(&[0]), &opts(DAY));
    let left = apply(&cache, &p.batches);
    assert!(left.contains(&nar_key(0)));
    assert!(!left.contains(&narinfo_key(&hash(1))));
    assert_eq!(p.deleted.nars.objects, 0);
}

#[test]
fn nothing_younger_than_the_grace_goes_and_a_young_narinfo_keeps_its_closure() {
    // 0 is young and refers to the old 1; NAR 3, an orphan, is young (an upload whose
    // narinfo is not there yet); narinfo 2 is old but its .ls was just written.
    let mut young = old(&[1], 0);
    young.age = 60;
    let mut two = old(&[], 2);
    two.listing = true;
    let cache = Cache {
        paths: vec![young, old(&[], 1), two],
        nar_ages: vec![10 * DAY, 10 * DAY, 10 * DAY, 60],
        log_ages: vec![],
    };
    // The .ls is younger than its narinfo.
    let mut b = IndexBuilder::default();
    for (i, p) in cache.paths.iter().enumerate() {
        let refs: Vec<HashPart> = p.refs.iter().map(|&r| hash(r)).collect();
        b.narinfo(hash(i), stat(p.age, 500), &nar_key(p.nar), &refs, None);
    }
    b.listing(hash(2), stat(60, 40));
    for (n, &age) in cache.nar_ages.iter().enumerate() {
        b.nar(&nar_key(n), stat(age, 1));
    }
    let p = plan(&b.build(), &Roots::default(), &opts(DAY));
    let left = apply(&cache, &p.batches);
    assert_eq!(
        p.roots.iter().map(|r| (r.hash, r.why)).collect::<Vec<_>>(),
        vec![(hash(0), RootReason::Grace)]
    );
    for k in [
        narinfo_key(&hash(0)),
        narinfo_key(&hash(1)),
        nar_key(0),
        nar_key(1),
        nar_key(3),
        listing_key(&hash(2)),
    ] {
        assert!(left.contains(&k), "{k} was deleted");
    }
    assert!(!left.contains(&narinfo_key(&hash(2))));
    assert!(!left.contains(&nar_key(2)));
}

#[test]
fn newer_than_keeps_by_modification_time_and_a_missing_root_keeps_nothing() {
    let mut recent = old(&[1], 0);
    recent.age = 2 * DAY;
    let cache = Cache {
        paths: vec![recent, old(&[], 1), old(&[], 2)],
        nar_ages: vec![10 * DAY; 3],
        log_ages: vec![],
    };
    let roots = Roots {
        paths: vec![(hash(99), RootReason::File)],
        newer_than: Some(NOW - 3 * DAY as i64),
    };
    let p = plan(&cache.index(), &roots, &opts(DAY));
    assert_eq!(p.roots.len(), 2);
    assert!(!p.roots[0].present);
    assert_eq!(
        (p.roots[1].hash, p.roots[1].why),
        (hash(0), RootReason::NewerThan)
    );
    let left = apply(&cache, &p.batches);
    assert!(left.contains(&narinfo_key(&hash(1))));
    assert!(!left.contains(&narinfo_key(&hash(2))));
}

#[test]
fn listings_go_with_their_narinfos_and_logs_with_the_last_narinfo_of_their_derivation() {
    let mut a = old(&[], 0);
    a.listing = true;
    a.log = Some(0);
    // 1 and 2 are outputs of one derivation (log 1); 2 is kept, so the log stays.
    let mut b = old(&[], 1);
    b.log = Some(1);
    let mut c = old(&[], 2);
    c.log = Some(1);
    let cache = Cache {
        paths: vec![a, b, c],
        nar_ages: vec![10 * DAY; 3],
        // Log 2 belongs to no narinfo here: not gc's to judge.
        log_ages: vec![10 * DAY; 3],
    };
    let p = plan(&cache.index(), &keep(&[2]), &opts(DAY));
    let first = &p.batches[0];
    assert!(
        first.keys.contains(&narinfo_key(&hash(0))) && first.keys.contains(&listing_key(&hash(0)))
    );
    let left = apply(&cache, &p.batches);
    assert!(!left.contains("log/00000000000000000000000000000000-x.drv"));
    assert!(left.contains("log/00000000000000000000000000000001-x.drv"));
    assert!(left.contains("log/00000000000000000000000000000002-x.drv"));
    assert_eq!(p.batches.last().map(|b| b.phase), Some(Phase::Logs));
    assert_eq!((p.deleted.listings.objects, p.deleted.logs.objects), (1, 1));
}

#[test]
fn batches_hold_at_most_the_batch_size_and_a_narinfo_stays_with_its_listing() {
    let paths: Vec<Path> = (0..25)
        .map(|i| Path {
            listing: i % 2 == 0,
            ..old(&[], i)
        })
        .collect();
    let cache = Cache {
        nar_ages: vec![10 * DAY; 25],
        paths,
        log_ages: vec![],
    };
    let p = plan(
        &cache.index(),
        &Roots::default(),
        &GcOptions {
            batch_size: 4,
            ..opts(DAY)
        },
    );
    for b in &p.batches {
        assert!(b.keys.len() <= 4);
        for k in b.keys.iter().filter(|k| k.ends_with(".ls")) {
            let narinfo = k.replace(".ls", ".narinfo");
            assert!(b.keys.contains(&narinfo), "{k} without its narinfo");
        }
    }
    assert!(apply(&cache, &p.batches).is_empty());
}

#[test]
fn a_circle_of_unreachable_narinfos_is_left_and_reported() {
    // A damaged cache: 0 and 1 refer to each other; 2 refers into the circle.
    let cache = Cache {
        paths: vec![old(&[1], 0), old(&[0], 1), old(&[0], 2)],
        nar_ages: vec![10 * DAY; 3],
        log_ages: vec![],
    };
    let p = plan(&cache.index(), &Roots::default(), &opts(DAY));
    let left = apply(&cache, &p.batches);
    assert_eq!(p.circular, vec![hash(0), hash(1)]);
    assert!(!left.contains(&narinfo_key(&hash(2))));
    for k in [
        narinfo_key(&hash(0)),
        narinfo_key(&hash(1)),
        nar_key(0),
        nar_key(1),
    ] {
        assert!(left.contains(&k));
    }
}

#[test]
fn a_large_cache_is_planned_in_a_compact_index() {
    // 120,000 narinfos in chains of 10; every tenth chain kept.
    let n = 120_000;
    let mut b = IndexBuilder::default();
    for i in 0..n {
        let refs: Vec<HashPart> = if i % 10 == 9 {
            vec![]
        } else {
            vec![hash(i + 1)]
        };
        b.narinfo(hash(i), stat(10 * DAY, 500), &nar_key(i), &refs, None);
        b.nar(&nar_key(i), stat(10 * DAY, 1));
    }
    let index = b.build();
    let roots = keep(&(0..n).step_by(100).collect::<Vec<_>>());
    let p = plan(&index, &roots, &opts(DAY));
    assert_eq!(p.kept.narinfos.objects, 12_000);
    assert_eq!(p.deleted.narinfos.objects, 108_000);
    assert_eq!(p.deleted.nars.objects, 108_000);
    // Ten layers of narinfos, 10,800 a layer, in batches of 1,000.
    let layers: BTreeMap<u32, usize> = p.batches.iter().fold(BTreeMap::new(), |mut m, b| {
        if let Phase::Narinfos { layer } = b.phase {
            *m.entry(layer).or_default() += b.keys.len();
        }
        m
    });
    assert_eq!(layers.len(), 10);
    assert!(layers.values().all(|&c| c == 10_800));
}

fn arb_cache() -> impl Strategy<Value = (Cache, Vec<usize>, u64)> {
    (1usize..40).prop_flat_map(|n| {
        let path = |i: usize| {
            (
                // References only to later paths: a cache Nix wrote has no circles.
                proptest::collection::vec(0..n.max(1), 0..4),
                0..n + 3,
                proptest::option::of(0usize..4),
                prop_oneof![Just(60u64), Just(10 * DAY)],
                any::<bool>(),
            )
                .prop_map(move |(refs, nar, log, age, listing)| Path {
                    refs: refs.into_iter().filter(|&r| r > i).collect(),
                    nar,
                    log,
                    age,
                    listing,
                })
        };
        (
            (0..n).map(path).collect::<Vec<_>>(),
            proptest::collection::vec(prop_oneof![Just(60u64), Just(10 * DAY)], n + 3),
            proptest::collection::vec(prop_oneof![Just(60u64), Just(10 * DAY)], 4),
            proptest::collection::vec(0..n, 0..3),
            prop_oneof![Just(0u64), Just(DAY)],
        )
            .prop_map(|(paths, nar_ages, log_ages, roots, grace)| {
                (
                    Cache {
                        paths,
                        nar_ages,
                        log_ages,
                    },
                    roots,
                    grace,
                )
            })
    })
}

proptest! {
    /// Any cache: every batch can go in any order without a visible state where a
    /// narinfo lacks a reference or its NAR; what is left is exactly the closure of the
    /// roots and of the narinfos younger than the grace, with their NARs, and the objects
    /// younger than the grace.
    #[test]
    fn every_state_is_closed_and_exactly_the_unreachable_old_objects_go(
        (cache, roots, grace) in arb_cache(),
        batch_size in 2usize..6,
    ) {
        let p = plan(&cache.index(), &keep(&roots), &GcOptions { batch_size, ..opts(grace) });
        let left = apply(&cache, &p.batches);
        let young = |age: u64| age < grace;
        let mut live_roots = roots.clone();
        live_roots.extend((0..cache.paths.len()).filter(|&i| young(cache.paths[i].age)));
        let live = cache.closure(&live_roots);
        prop_assert!(p.circular.is_empty());
        for (i, path) in cache.paths.iter().enumerate() {
            prop_assert_eq!(left.contains(&narinfo_key(&hash(i))), live.contains(&i), "narinfo {}", i);
            if path.listing {
                prop_assert_eq!(left.contains(&listing_key(&hash(i))), live.contains(&i) || young(path.age));
            }
        }
        for (nar, &age) in cache.nar_ages.iter().enumerate() {
            let named = live.iter().any(|&i| cache.paths[i].nar == nar);
            prop_assert_eq!(left.contains(&nar_key(nar)), named || young(age), "NAR {}", nar);
        }
        for (log, &age) in cache.log_ages.iter().enumerate() {
            let of_deleted = cache.paths.iter().enumerate().any(|(i, p)| p.log == Some(log) && !live.contains(&i));
            let of_kept = live.iter().any(|&i| cache.paths[i].log == Some(log));
            let key = format!("log/{log:032}-x.drv");
            prop_assert_eq!(left.contains(&key), of_kept || !of_deleted || young(age), "log {}", log);
        }
    }
}

#[test]
fn a_root_is_a_store_path_a_path_below_one_a_basename_or_a_hash_part() {
    let hash_part = "0c6kzph7l0dcbfmjap64f0czdafn3b7x";
    let want = super::index::parse_hash_part(hash_part).unwrap();
    for text in [
        format!("/nix/store/{hash_part}-hello-2.12"),
        format!("/nix/store/{hash_part}-hello-2.12/bin/hello"),
        format!("{hash_part}-hello-2.12"),
        hash_part.to_owned(),
    ] {
        assert_eq!(parse_root(&text, "/nix/store"), Ok(want), "{text}");
    }
    for bad in [
        "/tmp/x",
        "hello",
        "/nix/store/short-x",
        "0c6kzph7l0dcbfmjap64f0czdafn3b7e",
    ] {
        assert!(parse_root(bad, "/nix/store").is_err(), "{bad}");
    }
}

#[test]
fn a_keep_file_skips_blanks_and_comments_and_any_bad_line_refuses_it_all() {
    let good = "# kept\n\n  /nix/store/0c6kzph7l0dcbfmjap64f0czdafn3b7x-a  \n1c6kzph7l0dcbfmjap64f0czdafn3b7x\n";
    assert_eq!(parse_keep_file(good, "/nix/store").map(|r| r.len()), Ok(2));
    let bad = format!("{good}typo\n/nix/store/x\n");
    let lines: Vec<usize> = parse_keep_file(&bad, "/nix/store")
        .unwrap_err()
        .iter()
        .map(|b| b.line)
        .collect();
    assert_eq!(lines, vec![5, 6]);
}
