//! `narflow verify` without downloading NARs: one listing of the cache (objects and their
//! sizes, unfinished multipart uploads), then every narinfo checked against it — it parses
//! and names its own hash part, a trusted key signs it, its NAR is there with exactly its
//! FileSize, every reference's narinfo is there — and what nothing names reported
//! (orphan NARs, temporary files and staging objects, unfinished uploads).
//!
//! Memory grows with the listing, compactly: 20 bytes a narinfo (its hash part), about 50
//! a NAR (its FileHash's 32 bytes, a suffix index, its size, one flag); narinfo texts are
//! read [`BATCH`] at a time. It never writes to
//! the cache.
use crate::cache::{BinaryCache, CacheError, NarinfoSet, ObjectInfo, narinfo_hash};
use crate::format::narinfo::NarInfo;
use crate::format::nix32;
use crate::format::signing::VerifyingKey;
use crate::format::store_path::StorePath;
use rayon::prelude::*;
use std::collections::{HashSet, VecDeque};
use std::fmt;

/// Narinfos read per request batch: enough to keep a remote cache's concurrency busy,
/// while their texts (a few KiB each) stay a few MiB at most.
pub const BATCH: usize = 512;

/// What is wrong with an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A narinfo that does not parse.
    Unparsable,
    /// A narinfo whose StorePath has another hash part than its key.
    WrongStorePath,
    /// A narinfo with a signature by a trusted key's name that does not verify, and none
    /// that does.
    BadSignature,
    /// A narinfo signed by no trusted key (or not at all).
    Untrusted,
    /// A narinfo whose NAR (its URL) is not in the cache.
    NarMissing,
    /// A narinfo whose NAR is in the cache with another size than its FileSize.
    NarSize,
    /// A narinfo with a reference whose narinfo is not in the cache.
    MissingReference,
    /// A path asked about that has no narinfo in the cache.
    MissingNarinfo,
    /// A NAR no narinfo names. This kind and the two after it are looked for only when
    /// the whole cache is verified.
    OrphanNar,
    /// A temporary file or staging object an upload left behind (or one still running).
    Leftover,
    /// A multipart upload neither completed nor aborted.
    UnfinishedUpload,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 11] = [
        Kind::Unparsable,
        Kind::WrongStorePath,
        Kind::BadSignature,
        Kind::Untrusted,
        Kind::NarMissing,
        Kind::NarSize,
        Kind::MissingReference,
        Kind::MissingNarinfo,
        Kind::OrphanNar,
        Kind::Leftover,
        Kind::UnfinishedUpload,
    ];

    /// The kind's name in reports and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Unparsable => "unparsable-narinfo",
            Kind::WrongStorePath => "wrong-store-path",
            Kind::BadSignature => "bad-signature",
            Kind::Untrusted => "untrusted",
            Kind::NarMissing => "nar-missing",
            Kind::NarSize => "nar-size",
            Kind::MissingReference => "missing-reference",
            Kind::MissingNarinfo => "missing-narinfo",
            Kind::OrphanNar => "orphan-nar",
            Kind::Leftover => "leftover",
            Kind::UnfinishedUpload => "unfinished-upload",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem: the object and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: Kind,
    /// The object's key (`<hash>.narinfo`, `nar/...`), or a store path asked about.
    pub object: String,
    /// What is wrong, in words.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.kind, self.detail)
    }
}

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub store_dir: String,
    /// A narinfo needs a valid signature by one of these.
    pub trusted: Vec<VerifyingKey>,
    /// `None`: the whole cache, with what nothing names (orphan NARs, leftovers,
    /// unfinished uploads). Some: these paths and every path their narinfos reach through
    /// References, nothing else.
    pub paths: Option<Vec<StorePath>>,
}

/// What a run looked at, and the problems it found by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Narinfos checked.
    pub narinfos: u64,
    /// NARs in the listing, and their bytes.
    pub nars: u64,
    pub nar_bytes: u64,
    /// Problems, by [`Kind::ALL`]'s order.
    pub problems: [u64; Kind::ALL.len()],
}

impl Summary {
    /// Problems of every kind.
    pub fn total_problems(&self) -> u64 {
        self.problems.iter().sum()
    }
    /// Problems of `kind`.
    pub fn count(&self, kind: Kind) -> u64 {
        self.problems[kind as usize]
    }
}

/// Characters of a SHA-256 in nix32, as NAR keys spell FileHash.
const FILE_HASH_LEN: usize = nix32::encoded_len(32);

/// A NAR's key, compactly: `nar/<FileHash in nix32><suffix>` as the hash's 32 bytes and
/// the index of its suffix (`.nar.zst`, `.nar.xz`, ...) in [`Listing::suffixes`]; any other
/// key as itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum NarKey {
    Hashed([u8; 32], u8),
    Other(Box<str>),
}

/// The cache as its listing shows it, compactly.
#[derive(Debug, Default)]
struct Listing {
    narinfos: Vec<[u8; 20]>,
    /// NAR keys (under `nar/`) and sizes, sorted by key once listed.
    nars: Vec<(NarKey, u64)>,
    /// The suffixes of [`NarKey::Hashed`] keys (a handful: one per compression).
    suffixes: Vec<Box<str>>,
    leftovers: Vec<(String, u64)>,
}

/// Whether `key` is what an interrupted upload leaves behind: a `file://` cache's
/// temporary file or an S3 cache's staging object.
pub fn is_leftover(key: &str) -> bool {
    use crate::cache::file::TEMP_PREFIX;
    let name = key.strip_prefix("nar/").unwrap_or(key);
    name.starts_with(TEMP_PREFIX) || key.starts_with(crate::cache::s3::STAGING_PREFIX)
}

impl Listing {
    fn add(&mut self, o: ObjectInfo<'_>) {
        if let Some(h) = narinfo_hash(o.key.as_bytes()) {
            self.narinfos.push(h);
        } else if is_leftover(o.key) {
            self.leftovers.push((o.key.to_owned(), o.size));
        } else if o.key.starts_with("nar/") {
            let key = self.nar_key(o.key, true).expect("a key is added");
            self.nars.push((key, o.size));
        }
    }

    /// The compact form of the NAR key `key`; `None` when it has a suffix the listing
    /// does not know (so no NAR of the listing has that key), unless `add`, which adds
    /// the suffix.
    fn nar_key(&mut self, key: &str, add: bool) -> Option<NarKey> {
        let hashed = key
            .strip_prefix("nar/")
            .filter(|rest| rest.len() >= FILE_HASH_LEN && rest.is_char_boundary(FILE_HASH_LEN))
            .and_then(|rest| {
                let (hash, suffix) = rest.split_at(FILE_HASH_LEN);
                let bytes = nix32::decode::<32>(hash.as_bytes()).ok()?;
                // Only the canonical spelling, so that the key reads back the same.
                (nix32::encode(&bytes) == hash).then_some((bytes, suffix))
            });
        let Some((bytes, suffix)) = hashed else {
            return Some(NarKey::Other(key.into()));
        };
        let index = match self.suffixes.iter().position(|s| **s == *suffix) {
            Some(i) => i,
            None if !add => return None,
            None if self.suffixes.len() > usize::from(u8::MAX) => {
                return Some(NarKey::Other(key.into()));
            }
            None => {
                self.suffixes.push(suffix.into());
                self.suffixes.len() - 1
            }
        };
        Some(NarKey::Hashed(
            bytes,
            u8::try_from(index).expect("at most 256 suffixes"),
        ))
    }

    /// The key a [`NarKey`] stands for.
    fn nar_name(&self, key: &NarKey) -> String {
        match key {
            NarKey::Hashed(bytes, i) => {
                format!(
                    "nar/{}{}",
                    nix32::encode(bytes),
                    self.suffixes[usize::from(*i)]
                )
            }
            NarKey::Other(k) => k.to_string(),
        }
    }

    fn finish(&mut self) {
        self.narinfos.sort_unstable();
        self.narinfos.dedup();
        self.narinfos.shrink_to_fit();
        self.nars.sort_unstable();
        self.nars.shrink_to_fit();
    }

    fn has_narinfo(&self, h: &[u8; 20]) -> bool {
        self.narinfos.binary_search(h).is_ok()
    }

    fn nar(&mut self, key: &str) -> Option<usize> {
        let key = self.nar_key(key, false)?;
        self.nars.binary_search_by(|(k, _)| k.cmp(&key)).ok()
    }
}

/// A narinfo read and checked on its own (before the listing is consulted).
enum Read {
    /// It does not parse, or names another path: nothing more can be checked.
    Damaged(Kind, String),
    /// It parsed; what is wrong with its signatures, if anything.
    Parsed(Box<NarInfo>, Option<(Kind, String)>),
}

/// Parses `text`, the narinfo listed as hash part `h`, and checks its signatures.
fn read_narinfo(text: &str, h: &[u8; 20], opts: &VerifyOptions) -> Read {
    let n = match NarInfo::parse(text, &opts.store_dir) {
        Ok(n) => n,
        Err(e) => return Read::Damaged(Kind::Unparsable, e.to_string()),
    };
    if NarinfoSet::key(&n.store_path) != *h {
        let detail = format!("names {}", n.store_path.to_absolute(&opts.store_dir));
        return Read::Damaged(Kind::WrongStorePath, detail);
    }
    if n.valid_signatures(&opts.store_dir, &opts.trusted) > 0 {
        return Read::Parsed(Box::new(n), None);
    }
    let by_trusted_name = n
        .sigs
        .iter()
        .any(|s| opts.trusted.iter().any(|k| k.name() == s.key_name));
    let problem = if by_trusted_name {
        let detail = "a signature by a trusted key's name does not verify".to_owned();
        (Kind::BadSignature, detail)
    } else if n.sigs.is_empty() {
        (Kind::Untrusted, "not signed".to_owned())
    } else {
        let names: Vec<&str> = n.sigs.iter().map(|s| s.key_name.as_str()).collect();
        let detail = format!("signed only by untrusted keys: {}", names.join(", "));
        (Kind::Untrusted, detail)
    };
    Read::Parsed(Box::new(n), Some(problem))
}

/// A batch of narinfos read from the cache: their hash parts, keys and texts.
struct Fetched {
    batch: Vec<[u8; 20]>,
    keys: Vec<String>,
    texts: Vec<Option<String>>,
}

/// Verifies `cache` as `opts` says, handing each problem to `report` as it is found.
///
/// # Errors
/// [`CacheError`] when the cache cannot be listed or read ([`CacheError::Config`] for a
/// cache that cannot list at all).
pub fn verify(
    cache: &dyn BinaryCache,
    opts: &VerifyOptions,
    report: &mut dyn FnMut(Problem),
) -> Result<Summary, CacheError> {
    let mut summary = Summary::default();
    let mut emit = |summary: &mut Summary, kind: Kind, object: String, detail: String| {
        summary.problems[kind as usize] += 1;
        report(Problem {
            kind,
            object,
            detail,
        });
    };

    let mut listing = Listing::default();
    if !cache.list_objects(&mut |o| listing.add(o))? {
        return Err(CacheError::Config(format!(
            "{}: this cache cannot be listed, so it cannot be verified",
            cache.url()
        )));
    }
    listing.finish();
    summary.nars = listing.nars.len() as u64;
    summary.nar_bytes = listing.nars.iter().map(|(_, s)| s).sum();
    let mut named = vec![false; listing.nars.len()];

    // The narinfos to read: all, or the given paths and what they reach.
    let mut queue: VecDeque<[u8; 20]> = VecDeque::new();
    let mut seen: HashSet<[u8; 20]> = HashSet::new();
    match &opts.paths {
        None => queue.extend(listing.narinfos.iter().copied()),
        Some(paths) => {
            for p in paths {
                let h = NarinfoSet::key(p);
                if !listing.has_narinfo(&h) {
                    emit(
                        &mut summary,
                        Kind::MissingNarinfo,
                        p.to_absolute(&opts.store_dir),
                        "the cache has no narinfo for it".into(),
                    );
                } else if seen.insert(h) {
                    queue.push_back(h);
                }
            }
        }
    }

    let fetch = |batch: Vec<[u8; 20]>| -> Result<Fetched, CacheError> {
        let keys: Vec<String> = batch
            .iter()
            .map(|h| format!("{}.narinfo", nix32::encode(h)))
            .collect();
        let texts = cache.get_texts(&keys)?;
        Ok(Fetched { batch, keys, texts })
    };
    let take = |queue: &mut VecDeque<[u8; 20]>| -> Vec<[u8; 20]> {
        queue.drain(..queue.len().min(BATCH)).collect()
    };
    // One batch is read from the cache while the one before it is checked: two batches'
    // texts in memory at most.
    std::thread::scope(|scope| -> Result<(), CacheError> {
        let mut next = if queue.is_empty() {
            None
        } else {
            Some(fetch(take(&mut queue))?)
        };
        while let Some(Fetched { batch, keys, texts }) = next.take() {
            let ahead = (!queue.is_empty()).then(|| {
                let batch = take(&mut queue);
                scope.spawn(|| fetch(batch))
            });
            // Parsing and signature checks (the CPU work) run across the batch in parallel.
            let read: Vec<Option<Read>> = texts
                .par_iter()
                .zip(&batch)
                .map(|(text, h)| text.as_deref().map(|t| read_narinfo(t, h, opts)))
                .collect();
            drop(texts);
            for (key, read) in keys.into_iter().zip(read) {
                // Removed since the listing: nothing left to check.
                let Some(read) = read else { continue };
                summary.narinfos += 1;
                let n = match read {
                    Read::Damaged(kind, detail) => {
                        emit(&mut summary, kind, key, detail);
                        continue;
                    }
                    Read::Parsed(n, signature) => {
                        if let Some((kind, detail)) = signature {
                            emit(&mut summary, kind, key.clone(), detail);
                        }
                        n
                    }
                };
                match listing.nar(&n.url) {
                    None => emit(
                        &mut summary,
                        Kind::NarMissing,
                        key.clone(),
                        format!("its NAR {} is not in the cache", n.url),
                    ),
                    Some(i) => {
                        named[i] = true;
                        let have = listing.nars[i].1;
                        if let Some(want) = n.file_size.filter(|&w| w != have) {
                            emit(
                                &mut summary,
                                Kind::NarSize,
                                key.clone(),
                                format!("its NAR {} has {have} bytes, FileSize says {want}", n.url),
                            );
                        }
                    }
                }
                for r in n.references.iter().filter(|r| **r != n.store_path) {
                    let rh = NarinfoSet::key(r);
                    if !listing.has_narinfo(&rh) {
                        emit(
                            &mut summary,
                            Kind::MissingReference,
                            key.clone(),
                            format!(
                                "its reference {} has no narinfo in the cache",
                                r.to_absolute(&opts.store_dir)
                            ),
                        );
                    } else if opts.paths.is_some() && seen.insert(rh) {
                        queue.push_back(rh);
                    }
                }
            }
            next = match ahead {
                Some(h) => Some(h.join().expect("a batch read does not panic")?),
                None if queue.is_empty() => None,
                None => Some(fetch(take(&mut queue))?),
            };
        }
        Ok(())
    })?;
    if opts.paths.is_none() {
        for ((key, size), named) in listing.nars.iter().zip(&named) {
            if !named {
                let detail = format!("no narinfo names it ({size} bytes)");
                emit(&mut summary, Kind::OrphanNar, listing.nar_name(key), detail);
            }
        }
    }
    if opts.paths.is_none() {
        for (key, size) in std::mem::take(&mut listing.leftovers) {
            let detail = format!("left behind by an upload, or one still running ({size} bytes)");
            emit(&mut summary, Kind::Leftover, key, detail);
        }
        for u in cache.list_unfinished_uploads()? {
            let detail = format!(
                "multipart upload {} was never completed nor aborted",
                u.upload_id
            );
            emit(&mut summary, Kind::UnfinishedUpload, u.key, detail);
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests;
