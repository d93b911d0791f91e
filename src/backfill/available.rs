//! What a backfill knows to be available to referrers: paths the cache has, and paths
//! this run settled (uploaded, found present, skipped).
//!
//! Owns those sets and their size: one bit per `ValidPaths.id` for what this run
//! settled or learnt is in the cache (125 KB for a million ids), and the cache's listing
//! ([`NarinfoSet`]: sorted 20-byte hash parts, 20 bytes a narinfo). A path
//! without a database id (a store read through `nix path-info`) is kept by its hash part.
//! It never asks the store or the cache anything: the walk resolves ids and lists.

use super::hash_key;
use crate::cache::NarinfoSet;
use crate::format::store_path::StorePath;
use fixedbitset::FixedBitSet;
use std::collections::HashMap;

/// How a path is known to the sets: by its `ValidPaths.id`, or by its hash part when the
/// store has no database (or the id does not fit in 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Id(u32),
    Hash([u8; 20]),
}

impl Key {
    /// `path`'s key given its database id, if any.
    pub fn of(path: &StorePath, id: Option<i64>) -> Key {
        match id.and_then(|i| u32::try_from(i).ok()) {
            Some(i) => Key::Id(i),
            None => Key::Hash(hash_key(path)),
        }
    }
}

/// Where a path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Settled by this run (and counted in its summary).
    Counted,
    /// In the cache (listed, or found by a question), not counted yet.
    InCache,
}

/// The paths known available. Sets only grow; a path counted stays counted.
#[derive(Debug, Default)]
pub struct Available {
    /// The cache's listing, when it was listed.
    listing: NarinfoSet,
    /// Ids this run settled.
    counted: FixedBitSet,
    /// Ids found in the cache by a question, not counted yet.
    in_cache: FixedBitSet,
    /// Paths without an id: true once counted.
    by_hash: HashMap<[u8; 20], bool>,
    /// Ids skipped as served upstream: available, but never in this cache.
    upstream: FixedBitSet,
    /// Paths without an id skipped as served upstream.
    upstream_by_hash: std::collections::HashSet<[u8; 20]>,
}

impl Available {
    /// Takes the cache's listing.
    pub fn set_listing(&mut self, listing: NarinfoSet) {
        self.listing = listing;
    }

    /// Narinfos in the listing.
    pub fn listed(&self) -> usize {
        self.listing.len()
    }

    /// What is known of `path` (whose key is `key`).
    pub fn get(&self, path: &StorePath, key: Key) -> Option<Known> {
        let known = match key {
            Key::Id(i) => {
                if self.counted.contains(i as usize) {
                    Some(Known::Counted)
                } else if self.in_cache.contains(i as usize) {
                    Some(Known::InCache)
                } else {
                    None
                }
            }
            Key::Hash(_) => None,
        };
        if known.is_some() {
            return known;
        }
        let hash = match key {
            Key::Hash(h) => h,
            Key::Id(_) if self.by_hash.is_empty() && self.listing.is_empty() => return None,
            Key::Id(_) => hash_key(path),
        };
        match self.by_hash.get(&hash) {
            Some(true) => Some(Known::Counted),
            Some(false) => Some(Known::InCache),
            None if self.listing.contains_key(&hash) => Some(Known::InCache),
            None => None,
        }
    }

    /// Whether anything is known of `path`: it is available to referrers.
    pub fn contains(&self, path: &StorePath, key: Key) -> bool {
        self.get(path, key).is_some()
    }

    /// Whether this run settled `path` already.
    pub fn counted(&self, path: &StorePath, key: Key) -> bool {
        self.get(path, key) == Some(Known::Counted)
    }

    /// Records that this run settled the path of `key`.
    pub fn count(&mut self, key: Key) {
        match key {
            Key::Id(i) => {
                grow_to(&mut self.counted, i);
                self.counted.insert(i as usize);
            }
            Key::Hash(h) => {
                self.by_hash.insert(h, true);
            }
        }
    }

    /// Records that this run skipped the path of `key` as served upstream (it counts as
    /// settled, and is never looked for in this cache).
    pub fn skip(&mut self, key: Key) {
        self.count(key);
        match key {
            Key::Id(i) => {
                grow_to(&mut self.upstream, i);
                self.upstream.insert(i as usize);
            }
            Key::Hash(h) => {
                self.upstream_by_hash.insert(h);
            }
        }
    }

    /// Whether this run skipped the path of `key` as served upstream.
    pub fn skipped(&self, key: Key) -> bool {
        match key {
            Key::Id(i) => self.upstream.contains(i as usize),
            Key::Hash(h) => self.upstream_by_hash.contains(&h),
        }
    }

    /// Records that the cache has the path of `key` (unless it is counted already).
    pub fn found_in_cache(&mut self, key: Key) {
        match key {
            Key::Id(i) => {
                grow_to(&mut self.in_cache, i);
                self.in_cache.insert(i as usize);
            }
            Key::Hash(h) => {
                self.by_hash.entry(h).or_insert(false);
            }
        }
    }
}

/// Grows `set` to hold `id`, doubling (so a walk in id order grows it a few times, not
/// once per window).
fn grow_to(set: &mut FixedBitSet, id: u32) {
    let need = id as usize + 1;
    if set.len() < need {
        set.grow(need.max(set.len() * 2).max(1024));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(i: usize) -> StorePath {
        let hash = crate::format::nix32::encode(&[i as u8; 20]);
        StorePath::from_base_name(&format!("{hash}-p{i}")).unwrap()
    }

    #[test]
    fn a_listing_finds_its_hash_parts_whatever_the_order_they_came_in() {
        let keys: Vec<[u8; 20]> = (0u8..200).rev().map(|i| [i.wrapping_mul(37); 20]).collect();
        let set: NarinfoSet = keys.iter().chain(keys.iter()).copied().collect();
        assert_eq!(set.len(), 200, "repeats are one entry");
        for i in 0u8..=255 {
            assert_eq!(set.contains_key(&[i; 20]), keys.contains(&[i; 20]), "{i}");
        }
        let p = sp(9);
        let with_p: NarinfoSet = [hash_key(&p)].into_iter().collect();
        assert!(with_p.contains(&p) && !with_p.contains(&sp(10)));
        assert!(!NarinfoSet::default().contains_key(&[0; 20]));
        assert!(NarinfoSet::default().is_empty());
    }

    #[test]
    fn a_skipped_path_is_counted_and_known_as_served_upstream() {
        let mut a = Available::default();
        a.skip(Key::Id(7));
        a.skip(Key::Hash([3; 20]));
        a.count(Key::Id(8));
        assert!(a.counted(&sp(7), Key::Id(7)));
        assert!(a.skipped(Key::Id(7)) && a.skipped(Key::Hash([3; 20])));
        assert!(!a.skipped(Key::Id(8)) && !a.skipped(Key::Id(100_000)));
    }

    #[test]
    fn ids_are_counted_once_and_in_cache_until_counted() {
        let mut a = Available::default();
        let (p, q) = (sp(1), sp(2));
        // Id 0, an id past the first growth, and one far beyond.
        for id in [0u32, 1024, 5_000_000] {
            let k = Key::Id(id);
            assert_eq!(a.get(&p, k), None, "{id}");
            a.found_in_cache(k);
            assert_eq!(a.get(&p, k), Some(Known::InCache), "{id}");
            assert!(a.contains(&p, k) && !a.counted(&p, k));
            a.count(k);
            assert_eq!(a.get(&p, k), Some(Known::Counted), "{id}");
            a.found_in_cache(k);
            assert_eq!(a.get(&p, k), Some(Known::Counted), "counted stays counted");
        }
        assert_eq!(a.get(&q, Key::Id(1)), None, "a neighbour is not set");
        assert_eq!(a.get(&q, Key::Id(5_000_001)), None);
        assert_eq!(a.get(&q, Key::Id(u32::MAX)), None, "past the end");
    }

    #[test]
    fn a_million_ids_take_a_bit_each() {
        let mut a = Available::default();
        for id in 0..1_000_000u32 {
            a.count(Key::Id(id));
        }
        assert!(
            a.counted.len() / 8 <= 256 * 1024,
            "{} bits",
            a.counted.len()
        );
        assert!(a.counted(&sp(0), Key::Id(999_999)));
    }

    #[test]
    fn paths_without_an_id_are_kept_by_hash_and_the_listing_counts_as_in_cache() {
        let mut a = Available::default();
        let (p, q, r) = (sp(1), sp(2), sp(3));
        a.set_listing([hash_key(&q)].into_iter().collect());
        assert_eq!(a.listed(), 1);
        let kp = Key::of(&p, None);
        assert_eq!(kp, Key::Hash(hash_key(&p)));
        assert_eq!(a.get(&p, kp), None);
        a.found_in_cache(kp);
        assert_eq!(a.get(&p, kp), Some(Known::InCache));
        a.count(kp);
        a.found_in_cache(kp);
        assert_eq!(a.get(&p, kp), Some(Known::Counted));
        // Listed: in the cache whether it is known by id or by hash, until counted.
        assert_eq!(a.get(&q, Key::Id(7)), Some(Known::InCache));
        assert_eq!(a.get(&q, Key::of(&q, None)), Some(Known::InCache));
        a.count(Key::Id(7));
        assert_eq!(a.get(&q, Key::Id(7)), Some(Known::Counted));
        assert_eq!(a.get(&r, Key::Id(8)), None);
        assert_eq!(
            Key::of(&r, Some(i64::from(u32::MAX) + 1)),
            Key::Hash(hash_key(&r))
        );
        assert_eq!(Key::of(&r, Some(9)), Key::Id(9));
    }
}
