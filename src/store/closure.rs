//! Closures and topological order (references before referrers; self-references ignored).
//!
//! Owns the graph walks only; all store access goes through [`LocalStore::path_infos`],
//! one batch per breadth-first level, never one query per path.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use super::{LocalStore, PathInfo, StoreError};
use crate::format::store_path::StorePath;

/// See [`LocalStore::closure`]. Queries the store level by level (one batch per level).
///
/// # Errors
/// As [`LocalStore::path_infos`]: [`StoreError::NotValid`] names the first path (of
/// `paths`, or a reference of a valid path when the store changed between two levels) that
/// is not valid.
pub fn closure(store: &LocalStore, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
    let mut seen: HashSet<StorePath> = HashSet::with_capacity(paths.len());
    let mut level: Vec<StorePath> = paths
        .iter()
        .filter(|p| seen.insert((*p).clone()))
        .cloned()
        .collect();
    let mut infos = Vec::with_capacity(level.len());
    while !level.is_empty() {
        let mut next = Vec::new();
        for info in store.path_infos(&level)? {
            next.extend(
                info.references
                    .iter()
                    .filter(|r| seen.insert((*r).clone()))
                    .cloned(),
            );
            infos.push(info);
        }
        level = next;
    }
    Ok(topo_sort(infos))
}

/// Orders `infos` so each path comes after its references that are in the set, and of
/// the paths whose references are placed, the one with the longest chain of referrers
/// above it first (a pipeline then starts the longest chains of narinfos to publish
/// first). Ties are broken by store path, so the order is deterministic.
///
/// Kahn's algorithm with a heap of ready paths, twice (the first order gives each path's
/// chain of referrers): O((n + references) log n). References to
/// paths outside `infos` and self-references are ignored. Entries with the same path are
/// kept and placed together. A cycle (impossible in a valid store, whose only cycles are
/// self-references) is not an error: with a warning, the least path of the cycle is placed
/// as if its references were done, and the sort goes on, so everything is still returned.
pub fn topo_sort(infos: Vec<PathInfo>) -> Vec<PathInfo> {
    let order = topo_order(&infos);
    debug_assert_eq!(order.len(), infos.len());
    let mut slots: Vec<Option<PathInfo>> = infos.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|i| slots[i].take().expect("topo_order yields each index once"))
        .collect()
}

/// The first 8 bytes of the base name, as a number that orders like the path.
fn prefix(p: &StorePath) -> u64 {
    let b = p.base_name().as_bytes();
    u64::from_be_bytes(
        b[..8]
            .try_into()
            .expect("a base name is longer than 8 bytes"),
    )
}

/// The permutation [`topo_sort`] applies, as indices into `infos`.
fn topo_order(infos: &[PathInfo]) -> Vec<usize> {
    // Entries sorted by path (stably: equal paths keep their input order). Node `n` is the
    // n-th distinct path, so comparing node numbers compares paths, and its entries are
    // `by_path[first[n]..first[n + 1]]`.
    let mut by_path: Vec<usize> = (0..infos.len()).collect();
    // Comparing the first 8 bytes as a number first keeps the sort in one contiguous array;
    // the hash part is random, so the full comparison is rarely needed.
    let prefixes: Vec<u64> = infos.iter().map(|i| prefix(&i.path)).collect();
    by_path.sort_by(|&a, &b| {
        (prefixes[a].cmp(&prefixes[b])).then_with(|| infos[a].path.cmp(&infos[b].path))
    });
    let mut first: Vec<usize> = Vec::with_capacity(infos.len() + 1);
    for k in 0..by_path.len() {
        if k == 0 || infos[by_path[k - 1]].path != infos[by_path[k]].path {
            first.push(k);
        }
    }
    let nodes = first.len();
    first.push(by_path.len());
    // Nondecreasing, as nodes are in path order: a reference is found by binary search.
    let node_prefixes: Vec<u64> = (0..nodes).map(|n| prefixes[by_path[first[n]]]).collect();
    let node_of = |r: &StorePath| {
        let p = prefix(r);
        let from = node_prefixes.partition_point(|&q| q < p);
        (from..nodes)
            .take_while(|&n| node_prefixes[n] == p)
            .find(|&n| infos[by_path[first[n]]].path == *r)
    };

    // Edges reference -> referrer within the set, without self-references or repeats,
    // grouped by reference: `edges[out[d]..out[d + 1]]` are the referrers of `d`.
    let mut edges: Vec<(usize, usize)> = Vec::new();
    for n in 0..nodes {
        for &i in &by_path[first[n]..first[n + 1]] {
            edges.extend(
                infos[i]
                    .references
                    .iter()
                    .filter_map(node_of)
                    .filter(|&d| d != n)
                    .map(|d| (d, n)),
            );
        }
    }
    edges.sort_unstable();
    edges.dedup();
    let mut waiting_on = vec![0usize; nodes];
    let mut out = vec![0usize; nodes + 1];
    for &(d, n) in &edges {
        waiting_on[n] += 1;
        out[d + 1] += 1;
    }
    for d in 0..nodes {
        out[d + 1] += out[d];
    }
    let graph = Graph {
        edges: &edges,
        out: &out,
        waiting_on: &waiting_on,
    };

    // A node's height: the longest chain of referrers above it in the set (0: nothing in
    // the set refers to it). Computed over a first order (referrers come after), from
    // the last node back.
    let mut height = vec![0u32; nodes];
    for &d in graph.order(Reverse, |_| {}).iter().rev() {
        height[d] = graph
            .referrers(d)
            .map(|n| height[n].saturating_add(1))
            .max()
            .unwrap_or(0);
    }
    // The order: of the paths whose references are placed, the one with the longest chain
    // above it first (ties in path order). A pipeline works through the paths roughly in
    // this order and publishes a narinfo only after its references', a round trip a level
    // to a remote cache: the longest chains start first, and what is left at the end is
    // paths nothing waits for, not a chain to publish level after level.
    let nodes_order = graph.order(
        |n| (height[n], Reverse(n)),
        |n| {
            tracing::warn!(
                "reference cycle among the store paths to order (a corrupt store?); \
                 placing {} before some of its references",
                infos[by_path[first[n]]].path,
            );
        },
    );
    let mut order = Vec::with_capacity(infos.len());
    for n in nodes_order {
        order.extend_from_slice(&by_path[first[n]..first[n + 1]]);
    }
    order
}

/// The references between the distinct paths to order: `edges` (reference, referrer),
/// grouped by reference (`edges[out[d]..out[d + 1]]` are the referrers of `d`), and how
/// many references of each node are in the set.
struct Graph<'a> {
    edges: &'a [(usize, usize)],
    out: &'a [usize],
    waiting_on: &'a [usize],
}

impl Graph<'_> {
    fn referrers(&self, d: usize) -> impl Iterator<Item = usize> + '_ {
        self.edges[self.out[d]..self.out[d + 1]]
            .iter()
            .map(|&(_, n)| n)
    }

    /// Every node once, each after its references (Kahn's algorithm): of the nodes whose
    /// references are all placed, the greatest `key` goes next. A cycle (impossible in a
    /// valid store, whose only cycles are self-references) is not an error: the least
    /// node not yet placed is released as if its references were done (`on_cycle` is
    /// told), and the order goes on, so every node is still placed.
    fn order<K: Ord>(&self, key: impl Fn(usize) -> K, on_cycle: impl Fn(usize)) -> Vec<usize> {
        let nodes = self.waiting_on.len();
        let mut waiting_on = self.waiting_on.to_vec();
        let mut queued = vec![false; nodes];
        let mut ready: BinaryHeap<(K, usize)> = BinaryHeap::new();
        for n in (0..nodes).filter(|&n| waiting_on[n] == 0) {
            queued[n] = true;
            ready.push((key(n), n));
        }
        let mut order = Vec::with_capacity(nodes);
        // Only for a cycle: nodes below this are all queued.
        let mut unqueued_from = 0;
        loop {
            while let Some((_, d)) = ready.pop() {
                order.push(d);
                for n in self.referrers(d) {
                    waiting_on[n] = waiting_on[n].saturating_sub(1);
                    if waiting_on[n] == 0 && !queued[n] {
                        queued[n] = true;
                        ready.push((key(n), n));
                    }
                }
            }
            if order.len() == nodes {
                return order;
            }
            // Every remaining node waits on another: a cycle. Release the least node not
            // yet placed, so nodes outside the cycle still come after what they reference.
            while queued[unqueued_from] {
                unqueued_from += 1;
            }
            let n = unqueued_from;
            on_cycle(n);
            queued[n] = true;
            ready.push((key(n), n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::hash::Sha256;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// A store path whose name is `name` (hash part derived from it).
    fn sp(name: &str) -> StorePath {
        let h = Sha256::digest(name.as_bytes());
        let base = format!("{}-{name}", crate::format::nix32::encode(&h.0[..20]));
        StorePath::from_base_name(&base).unwrap()
    }

    fn info(name: &str, refs: &[&str]) -> PathInfo {
        let mut references: Vec<StorePath> = refs.iter().map(|r| sp(r)).collect();
        references.sort();
        PathInfo {
            path: sp(name),
            nar_hash: Sha256::digest(name.as_bytes()),
            nar_size: 8,
            references,
            deriver: None,
            sigs: Vec::new(),
            ca: None,
        }
    }

    fn names(infos: &[PathInfo]) -> Vec<&str> {
        infos.iter().map(|i| i.path.name()).collect()
    }

    /// `a` and `b` in store-path order.
    fn by_path<'a>(a: &'a str, b: &'a str) -> [&'a str; 2] {
        if sp(a) < sp(b) { [a, b] } else { [b, a] }
    }

    #[test]
    fn chain() {
        let sorted = topo_sort(vec![info("c", &["b"]), info("b", &["a"]), info("a", &[])]);
        assert_eq!(names(&sorted), ["a", "b", "c"]);
    }

    #[test]
    fn diamond() {
        let sorted = topo_sort(vec![
            info("top", &["left", "right"]),
            info("left", &["bottom"]),
            info("right", &["bottom"]),
            info("bottom", &[]),
        ]);
        let [first, second] = by_path("left", "right");
        assert_eq!(names(&sorted), ["bottom", first, second, "top"]);
    }

    #[test]
    fn self_references_and_outside_references_are_ignored() {
        let sorted = topo_sort(vec![
            info("lib", &["lib", "glibc-not-in-set"]),
            info("bin", &["bin", "lib", "also-outside"]),
        ]);
        assert_eq!(names(&sorted), ["lib", "bin"]);
    }

    #[test]
    fn deterministic_whatever_the_input_order() {
        let mut infos = vec![
            info("a", &[]),
            info("b", &[]),
            info("c", &["a"]),
            info("d", &["b", "c"]),
            info("e", &[]),
            info("f", &["e", "a"]),
        ];
        let first = topo_sort(infos.clone());
        // Independent roots: "a" (two levels above it: c, then d) first, then those with
        // one level above them in store-path order.
        let roots: Vec<&str> = names(&first)
            .into_iter()
            .filter(|n| ["a", "b", "e"].contains(n))
            .collect();
        let mut expected = vec!["b", "e"];
        expected.sort_by_key(|n| sp(n));
        expected.insert(0, "a");
        assert_eq!(roots, expected);
        for _ in 0..5 {
            infos.rotate_left(1);
            infos.swap(0, 3);
            assert_eq!(topo_sort(infos.clone()), first);
        }
    }

    #[test]
    fn the_longest_chain_of_referrers_goes_first() {
        // "leaf-*" and "top" are referred to by nothing; "deep" has a chain of three
        // above it. Whatever their paths, "deep" and each level above it with something
        // still above it come first, then the rest in store-path order.
        let mut infos = vec![
            info("deep", &[]),
            info("mid", &["deep"]),
            info("high", &["mid"]),
            info("top", &["high"]),
        ];
        for i in 0..8 {
            infos.push(info(&format!("leaf-{i}"), &[]));
        }
        let sorted = topo_sort(infos.clone());
        assert_eq!(names(&sorted)[..3], ["deep", "mid", "high"]);
        let mut leaves: Vec<&str> = names(&sorted)[3..].to_vec();
        let in_order = leaves.clone();
        leaves.sort_by_key(|n| sp(n));
        assert_eq!(in_order, leaves, "ties in store-path order");
        // A path with nothing above it that refers to the chain goes after it, among
        // the others with nothing above them.
        infos.push(info("user-of-mid", &["mid"]));
        let sorted = topo_sort(infos);
        assert_eq!(names(&sorted)[..3], ["deep", "mid", "high"]);
        let rest = names(&sorted)[3..].to_vec();
        let mut by_path = rest.clone();
        by_path.sort_by_key(|n| sp(n));
        assert_eq!(rest, by_path);
    }

    #[test]
    fn duplicates_are_kept_together() {
        let sorted = topo_sort(vec![info("b", &["a"]), info("a", &[]), info("b", &["a"])]);
        assert_eq!(names(&sorted), ["a", "b", "b"]);
    }

    #[test]
    fn a_cycle_terminates_with_every_path() {
        let sorted = topo_sort(vec![
            info("x", &["y"]),
            info("y", &["x"]),
            info("base", &[]),
            info("top", &["x"]),
        ]);
        let [first, second] = by_path("x", "y");
        assert_eq!(names(&sorted), ["base", first, second, "top"]);
    }

    #[test]
    fn empty() {
        assert!(topo_sort(Vec::new()).is_empty());
    }

    /// A random DAG over `n` paths (edges only from higher to lower index, so acyclic),
    /// with self-references and references outside the set sprinkled in, then shuffled.
    fn dag() -> impl Strategy<Value = Vec<PathInfo>> {
        (1usize..60)
            .prop_flat_map(|n| {
                (
                    Just(n),
                    proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n),
                    proptest::collection::vec(0u8..4, n),
                    Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
                )
            })
            .prop_map(|(n, edges, extras, order)| {
                let name = |i: usize| format!("p{i}");
                let mut infos: Vec<PathInfo> = (0..n)
                    .map(|i| {
                        let mut refs: Vec<String> =
                            (0..i).filter(|&j| edges[i][j]).map(name).collect();
                        if extras[i] & 1 != 0 {
                            refs.push(name(i));
                        }
                        if extras[i] & 2 != 0 {
                            refs.push(format!("outside{i}"));
                        }
                        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
                        info(&name(i), &refs)
                    })
                    .collect();
                let mut shuffled = Vec::with_capacity(n);
                for i in order {
                    shuffled.push(std::mem::replace(&mut infos[i], info("hole", &[])));
                }
                shuffled
            })
    }

    proptest! {
        #[test]
        fn references_come_first_and_nothing_is_lost(infos in dag()) {
            let sorted = topo_sort(infos.clone());
            let position: HashMap<&StorePath, usize> =
                sorted.iter().enumerate().map(|(i, p)| (&p.path, i)).collect();
            prop_assert_eq!(position.len(), infos.len());
            for (i, p) in sorted.iter().enumerate() {
                for r in &p.references {
                    if let Some(&j) = position.get(r) {
                        prop_assert!(j <= i, "{} before its reference {}", p.path, r);
                    }
                }
            }
            let key = |v: &[PathInfo]| {
                let mut v: Vec<String> = v.iter().map(|p| format!("{p:?}")).collect();
                v.sort();
                v
            };
            prop_assert_eq!(key(&sorted), key(&infos));
            // Deterministic: the input order does not matter.
            let mut reversed = infos;
            reversed.reverse();
            prop_assert_eq!(topo_sort(reversed), sorted);
        }
    }
}
