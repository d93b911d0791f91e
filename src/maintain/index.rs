//! The compact index of a cache that gc plans over: every narinfo by the 20 bytes of its
//! hash part, its references, the NAR it names, its `.ls` and its deriver's log, and every
//! NAR and log object with its size and modification time. A listing of the cache fills
//! it through [`IndexBuilder`]; this file never reads a cache itself.
//!
//! Memory: about 60 bytes a narinfo plus 4 a reference, and each NAR and log key once.

use crate::format::nix32;
use std::collections::HashMap;

/// A store path's hash part, decoded from its 32 nix32 characters.
pub type HashPart = [u8; 20];

/// Decodes a hash part (`0a1b…`, 32 nix32 characters); `None` when it is not one.
#[must_use]
pub fn parse_hash_part(s: &str) -> Option<HashPart> {
    nix32::decode::<20>(s.as_bytes()).ok()
}

/// The narinfo key of a hash part: `<hash part>.narinfo`.
#[must_use]
pub fn narinfo_key(hash: &HashPart) -> String {
    format!("{}.narinfo", nix32::encode(hash))
}

/// The NAR listing key of a hash part: `<hash part>.ls`.
#[must_use]
pub fn listing_key(hash: &HashPart) -> String {
    format!("{}.ls", nix32::encode(hash))
}

/// An object's size and modification time, as the cache's listing gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    /// Seconds since the Unix epoch, on the cache's clock (the server's, for S3).
    pub mtime: i64,
}

/// "None" for the `u32` links between entries.
const NONE: u32 = u32::MAX;

/// One narinfo of the index.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub stat: Stat,
    /// Index into [`CacheIndex::nars`], or [`NONE`] when its NAR is not in the cache.
    pub nar: u32,
    /// Its references (other narinfos of the index, itself left out) in
    /// `refs[refs_start..refs_start + refs_len]`.
    pub refs_start: u32,
    pub refs_len: u32,
    /// Its `<hash part>.ls`, when the cache has one.
    pub listing: Option<Stat>,
    /// Index into [`CacheIndex::logs`] of its deriver's log, or [`NONE`].
    pub log: u32,
}

impl Entry {
    pub fn nar(&self) -> Option<usize> {
        (self.nar != NONE).then_some(self.nar as usize)
    }
    pub fn log(&self) -> Option<usize> {
        (self.log != NONE).then_some(self.log as usize)
    }
}

/// An object other than a narinfo, by its key.
#[derive(Debug, Clone)]
pub struct Named {
    pub key: Box<str>,
    pub stat: Stat,
}

/// A narinfo as a listing reports it (its text read and parsed).
#[derive(Debug, Clone)]
struct RawNarinfo {
    hash: HashPart,
    stat: Stat,
    nar_url: Box<str>,
    /// Range in [`IndexBuilder::refs`].
    refs: (u32, u32),
    deriver: Option<Box<str>>,
}

/// Collects what a listing of the cache finds, in any order, then builds the
/// [`CacheIndex`].
#[derive(Debug, Default)]
pub struct IndexBuilder {
    narinfos: Vec<RawNarinfo>,
    refs: Vec<HashPart>,
    nars: Vec<Named>,
    listings: Vec<(HashPart, Stat)>,
    logs: Vec<Named>,
}

impl IndexBuilder {
    /// A narinfo: its hash part, its object, the NAR it names (`URL:`, e.g.
    /// `nar/<FileHash>.nar.zst`), its References' hash parts and its Deriver's basename.
    ///
    /// # Panics
    /// When more than `u32::MAX` references are added in all.
    pub fn narinfo(
        &mut self,
        hash: HashPart,
        stat: Stat,
        nar_url: &str,
        references: &[HashPart],
        deriver: Option<&str>,
    ) {
        let start = u32::try_from(self.refs.len()).expect("fewer than 2^32 references");
        self.refs.extend_from_slice(references);
        let len = u32::try_from(references.len()).expect("fewer than 2^32 references");
        self.narinfos.push(RawNarinfo {
            hash,
            stat,
            nar_url: nar_url.into(),
            refs: (start, len),
            deriver: deriver.map(Into::into),
        });
    }

    /// A NAR object (`nar/…`).
    pub fn nar(&mut self, key: &str, stat: Stat) {
        self.nars.push(Named {
            key: key.into(),
            stat,
        });
    }

    /// A NAR listing object, `<hash part>.ls`.
    pub fn listing(&mut self, hash: HashPart, stat: Stat) {
        self.listings.push((hash, stat));
    }

    /// A build log, `log/<drv basename>`; `drv` is the basename.
    pub fn log(&mut self, drv: &str, stat: Stat) {
        self.logs.push(Named {
            key: format!("log/{drv}").into(),
            stat,
        });
    }

    /// The index: narinfos sorted by hash part (a hash part listed twice keeps its first),
    /// references resolved to the narinfos the cache has (the others dropped, as is a
    /// narinfo's reference to itself), each narinfo linked to its NAR, `.ls` and log.
    #[must_use]
    pub fn build(mut self) -> CacheIndex {
        self.narinfos.sort_by_key(|n| n.hash);
        self.narinfos.dedup_by(|b, a| a.hash == b.hash);
        let hashes: Vec<HashPart> = self.narinfos.iter().map(|n| n.hash).collect();
        let find = |h: &HashPart| hashes.binary_search(h).ok();

        self.nars.sort_by(|a, b| a.key.cmp(&b.key));
        self.nars.dedup_by(|b, a| a.key == b.key);
        self.logs.sort_by(|a, b| a.key.cmp(&b.key));
        self.logs.dedup_by(|b, a| a.key == b.key);
        let mut listings: HashMap<HashPart, Stat> = HashMap::with_capacity(self.listings.len());
        listings.extend(self.listings.drain(..));

        let mut refs = Vec::with_capacity(self.refs.len());
        let mut entries = Vec::with_capacity(self.narinfos.len());
        for (i, n) in self.narinfos.iter().enumerate() {
            let start = refs.len();
            let (s, l) = (n.refs.0 as usize, n.refs.1 as usize);
            let mut own: Vec<u32> = self.refs[s..s + l]
                .iter()
                .filter_map(find)
                .filter(|&j| j != i)
                .map(|j| j as u32)
                .collect();
            own.sort_unstable();
            own.dedup();
            refs.extend(own);
            let nar = self
                .nars
                .binary_search_by(|o| (*o.key).cmp(&*n.nar_url))
                .map_or(NONE, |j| j as u32);
            let log = n.deriver.as_deref().map_or(NONE, |d| {
                let key = format!("log/{d}");
                self.logs
                    .binary_search_by(|o| (*o.key).cmp(key.as_str()))
                    .map_or(NONE, |j| j as u32)
            });
            entries.push(Entry {
                stat: n.stat,
                nar,
                refs_start: start as u32,
                refs_len: (refs.len() - start) as u32,
                listing: listings.get(&n.hash).copied(),
                log,
            });
        }
        CacheIndex {
            hashes,
            entries,
            refs,
            nars: self.nars,
            logs: self.logs,
        }
    }
}

/// A cache's narinfos (sorted by hash part), NARs and logs, linked by index.
#[derive(Debug, Default)]
pub struct CacheIndex {
    hashes: Vec<HashPart>,
    pub(crate) entries: Vec<Entry>,
    refs: Vec<u32>,
    pub(crate) nars: Vec<Named>,
    pub(crate) logs: Vec<Named>,
}

impl CacheIndex {
    /// How many narinfos the cache has.
    #[must_use]
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether the cache has no narinfo.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The position of the narinfo of `hash`, if the cache has one.
    #[must_use]
    pub fn find(&self, hash: &HashPart) -> Option<usize> {
        self.hashes.binary_search(hash).ok()
    }

    /// The hash part of the narinfo at `i`.
    #[must_use]
    pub fn hash(&self, i: usize) -> &HashPart {
        &self.hashes[i]
    }

    /// The positions of the narinfos the narinfo at `i` refers to.
    pub(crate) fn references(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let e = &self.entries[i];
        let s = e.refs_start as usize;
        self.refs[s..s + e.refs_len as usize]
            .iter()
            .map(|&j| j as usize)
    }
}
