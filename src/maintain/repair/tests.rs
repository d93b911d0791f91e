//! The repair planner: what goes up again, what cannot, and the order of deletions.
use super::*;
use crate::format::hash::Sha256;
use proptest::prelude::*;

const SD: &str = "/nix/store";

fn hash(i: usize) -> HashPart {
    let mut h = [0u8; 20];
    h[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    h
}

fn path(i: usize) -> StorePath {
    StorePath::from_base_name(&format!("{}-p{i}", nix32::encode(&hash(i)))).unwrap()
}

fn narinfo(i: usize, refs: &[usize]) -> NarInfo {
    NarInfo {
        store_path: path(i),
        url: format!("nar/{i}.nar.zst"),
        compression: "zstd".into(),
        file_hash: Some(Sha256::digest(b"f")),
        file_size: Some(1),
        nar_hash: Sha256::digest(b"n"),
        nar_size: 1,
        references: refs.iter().map(|&r| path(r)).collect(),
        deriver: None,
        sigs: vec![],
        ca: None,
    }
}

fn damaged(i: usize, kinds: &[Kind], missing: &[usize]) -> (HashPart, Damaged) {
    (
        hash(i),
        Damaged {
            kinds: kinds.iter().copied().collect(),
            narinfo: Some(narinfo(i, missing)),
            missing_refs: missing.iter().map(|&r| path(r)).collect(),
        },
    )
}

fn valid(ids: &[usize]) -> HashMap<HashPart, StorePath> {
    ids.iter().map(|&i| (hash(i), path(i))).collect()
}

#[test]
fn what_the_store_has_goes_up_again_and_the_rest_is_reported() {
    let d: BTreeMap<HashPart, Damaged> = [
        // In the store: a flipped byte (its NAR removed first), a truncated NAR (its size
        // tells the upload to replace it), a deleted NAR, a bad signature.
        damaged(0, &[Kind::FileHash], &[]),
        damaged(1, &[Kind::NarSize], &[]),
        damaged(2, &[Kind::NarMissing], &[]),
        damaged(3, &[Kind::BadSignature], &[]),
        // A missing reference the store has, one it does not.
        damaged(4, &[Kind::MissingReference], &[10]),
        damaged(5, &[Kind::MissingReference], &[11]),
        // Not in the store.
        damaged(6, &[Kind::NarHash], &[]),
    ]
    .into_iter()
    .collect();
    let listings: BTreeSet<HashPart> = [hash(0), hash(7)].into();
    let asked = [path(12), path(13)];
    let p = plan(
        &d,
        &listings,
        &asked,
        &valid(&[0, 1, 2, 3, 4, 5, 10, 12]),
        true,
        SD,
    );
    assert_eq!(
        p.reupload,
        vec![path(0), path(1), path(2), path(3)]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        p.delete_nars,
        vec!["nar/0.nar.zst".to_owned(), "nar/1.nar.zst".to_owned()]
    );
    let mut closure = vec![path(10), path(12)];
    closure.sort();
    assert_eq!(p.push_closure, closure);
    assert_eq!(p.relist, vec![path(0)]);
    assert_eq!(
        p.delete_listings,
        vec![format!("{}.ls", nix32::encode(&hash(7)))]
    );
    let doomed: Vec<HashPart> = p.unrepairable.iter().filter_map(|u| u.doomed).collect();
    assert_eq!(doomed, vec![hash(5), hash(6)]);
    let objects: Vec<&str> = p.unrepairable.iter().map(|u| u.object.as_str()).collect();
    assert!(
        objects.contains(&path(13).to_absolute(SD).as_str()),
        "{objects:?}"
    );
    assert!(
        p.unrepairable.iter().all(|u| !u.what.is_empty()),
        "each says what would have to happen"
    );
    assert!(p.sweep);
}

#[test]
fn a_narinfo_goes_after_its_referrers_and_its_nar_after_the_last_that_names_it() {
    // 0 → 1 → 2; 3 → 2; 4 is alone and shares 2's NAR; 5 and 6 refer to each other.
    let node = |refs: &[usize], nar: usize| Node {
        refs: refs.iter().map(|&r| hash(r)).collect(),
        nar: Some(format!("nar/{nar}")),
        listing: false,
    };
    let mut graph: BTreeMap<HashPart, Node> = [
        (hash(0), node(&[1], 0)),
        (hash(1), node(&[2, 1], 1)),
        (hash(2), node(&[], 2)),
        (hash(3), node(&[2], 3)),
        (hash(4), node(&[], 2)),
        (hash(5), node(&[6], 5)),
        (hash(6), node(&[5], 6)),
    ]
    .into_iter()
    .collect();
    graph.get_mut(&hash(1)).unwrap().listing = true;
    let key = |i: usize| format!("{}.narinfo", nix32::encode(&hash(i)));
    let d = deletion_batches(&graph, &[hash(2)].into());
    assert_eq!(d.narinfos, [hash(0), hash(1), hash(2), hash(3)].into());
    assert_eq!(
        d.batches,
        vec![
            vec![key(0), key(3)],
            vec![key(1), format!("{}.ls", nix32::encode(&hash(1)))],
            vec![key(2)],
            // 2's NAR stays: 4 names it.
            vec!["nar/0".to_owned(), "nar/1".to_owned(), "nar/3".to_owned()],
        ]
    );
    let d = deletion_batches(&graph, &[hash(5)].into());
    assert_eq!(
        d.batches,
        vec![
            vec![key(5), key(6)],
            vec!["nar/5".to_owned(), "nar/6".to_owned()]
        ]
    );
}

proptest! {
    /// Whatever the graph (references point to lower numbers) and whatever is doomed,
    /// after each batch every remaining narinfo's references and NAR are still there,
    /// and what is deleted is exactly the doomed and what reaches them.
    #[test]
    fn no_batch_breaks_the_closure_invariant(
        refs in prop::collection::vec(prop::collection::vec(0usize..30, 0..4), 1..30),
        nars in prop::collection::vec(0usize..20, 30),
        doomed in prop::collection::btree_set(0usize..30, 0..5),
    ) {
        let n = refs.len();
        let graph: BTreeMap<HashPart, Node> = (0..n)
            .map(|i| {
                let r: Vec<HashPart> = refs[i].iter().filter(|&&r| r < i).map(|&r| hash(r)).collect();
                (hash(i), Node { refs: r, nar: Some(format!("nar/{}", nars[i])), listing: i % 2 == 0 })
            })
            .collect();
        let doomed: BTreeSet<HashPart> = doomed.into_iter().filter(|&i| i < n).map(hash).collect();
        let d = deletion_batches(&graph, &doomed);
        let mut keys: BTreeSet<String> = graph
            .iter()
            .flat_map(|(h, node)| {
                let mut k = vec![format!("{}.narinfo", nix32::encode(h))];
                if node.listing {
                    k.push(format!("{}.ls", nix32::encode(h)));
                }
                k.extend(node.nar.clone());
                k
            })
            .collect();
        for batch in &d.batches {
            for k in batch {
                prop_assert!(keys.remove(k), "{} deleted twice or never there", k);
            }
            for (h, node) in &graph {
                if !keys.contains(&format!("{}.narinfo", nix32::encode(h))) {
                    continue;
                }
                for r in &node.refs {
                    let needed = format!("{}.narinfo", nix32::encode(r));
                    prop_assert!(keys.contains(&needed), "{} gone before a referrer", needed);
                }
                let nar = node.nar.as_ref().unwrap();
                prop_assert!(keys.contains(nar), "{} gone before a narinfo naming it", nar);
            }
        }
        for h in &doomed {
            prop_assert!(d.narinfos.contains(h));
        }
        // Nothing more goes than the doomed and their referrers.
        for h in &d.narinfos {
            let reaches = |start: &HashPart| {
                let mut todo = vec![*start];
                let mut seen = BTreeSet::new();
                while let Some(x) = todo.pop() {
                    if doomed.contains(&x) {
                        return true;
                    }
                    if seen.insert(x) {
                        todo.extend(graph[&x].refs.iter().copied());
                    }
                }
                false
            };
            prop_assert!(reaches(h));
        }
    }
}
