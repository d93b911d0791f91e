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
use super::contents::{Checked, Expected, check_nar};
use crate::cache::{BinaryCache, CacheError, NarinfoSet, ObjectInfo, narinfo_hash};
use crate::format::narinfo::NarInfo;
use crate::format::nix32;
use crate::format::signing::VerifyingKey;
use crate::format::store_path::StorePath;
use rayon::prelude::*;
use std::collections::{HashSet, VecDeque};

pub use super::problem::{BATCH, Kind, Problem};

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
    /// `Some(n)`: every NAR read and checked (`--contents`), `n` at a time.
    pub contents: Option<usize>,
}

/// What a run looked at, and the problems it found by kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Narinfos checked.
    pub narinfos: u64,
    /// NARs in the listing, and their bytes.
    pub nars: u64,
    pub nar_bytes: u64,
    /// With `--contents`: NARs read, their bytes, and the NAR bytes they decompressed to.
    pub nars_read: u64,
    pub file_bytes_read: u64,
    pub nar_bytes_decoded: u64,
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
    /// The hash parts of the `.ls` listings, sorted once listed.
    listings: Vec<[u8; 20]>,
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
        } else if let Some(h) = o
            .key
            .strip_suffix(".ls")
            .and_then(super::index::parse_hash_part)
        {
            self.listings.push(h);
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
        self.listings.sort_unstable();
        self.listings.shrink_to_fit();
    }

    fn has_listing(&self, h: &[u8; 20]) -> bool {
        self.listings.binary_search(h).is_ok()
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

/// Hears how far a run has got (the CLI draws it on a terminal). Called from the thread
/// that runs [`verify_with`] and from the threads that read NARs.
pub trait VerifyProgress: Sync {
    /// The listing is read: how many narinfos, and the bytes of the NARs to read (with
    /// `--contents`; 0 without).
    fn listed(&self, _narinfos: u64, _nar_bytes: u64) {}
    /// `n` more narinfos checked.
    fn narinfos(&self, _n: u64) {}
    /// `n` more bytes of NAR objects read.
    fn nar_bytes(&self, _n: u64) {}
}

/// No progress shown.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;
impl VerifyProgress for NoProgress {}

/// Verifies `cache` as `opts` says, handing each problem to `report` as it is found.
///
/// # Errors
/// As [`verify_with`].
pub fn verify(
    cache: &dyn BinaryCache,
    opts: &VerifyOptions,
    report: &mut dyn FnMut(Problem),
) -> Result<Summary, CacheError> {
    verify_with(cache, opts, &NoProgress, report)
}

/// A run's summary and where its problems go.
struct Out<'r> {
    summary: Summary,
    report: &'r mut dyn FnMut(Problem),
}

impl Out<'_> {
    fn emit(&mut self, kind: Kind, object: String, detail: String) {
        self.summary.problems[kind as usize] += 1;
        (self.report)(Problem {
            kind,
            object,
            detail,
        });
    }

    /// Takes in what checking one NAR came to.
    fn checked(
        &mut self,
        job: NarJob,
        checked: Result<Checked, CacheError>,
        error: &mut Option<CacheError>,
    ) {
        match checked {
            Ok(c) => {
                self.summary.nars_read += 1;
                self.summary.file_bytes_read += c.file_bytes;
                self.summary.nar_bytes_decoded += c.nar_bytes;
                for (kind, detail) in c.problems {
                    let object = match kind {
                        Kind::UnparsableListing | Kind::ListingMismatch => {
                            format!("{}.ls", nix32::encode(&job.hash))
                        }
                        _ => job.narinfo_key.clone(),
                    };
                    self.emit(kind, object, detail);
                }
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
}

/// One NAR to read and check (`--contents`).
#[derive(Debug)]
struct NarJob {
    hash: [u8; 20],
    narinfo_key: String,
    nar_key: String,
    want: Expected,
    /// The cache has the path's `.ls`.
    listing: bool,
}

/// Reads `job`'s NAR (and `.ls`) from `cache` and checks it.
fn check_job(
    cache: &dyn BinaryCache,
    job: &NarJob,
    progress: &dyn VerifyProgress,
) -> Result<Checked, CacheError> {
    let listing = if job.listing {
        let key = format!("{}.ls", nix32::encode(&job.hash));
        cache.get_text(&key)?.map(String::into_bytes)
    } else {
        None
    };
    // Removed since the listing: nothing left to check.
    let Some(mut nar) = cache.read_object(&job.nar_key)? else {
        return Ok(Checked::default());
    };
    check_nar(&mut nar, &job.want, listing.as_deref(), &|n| {
        progress.nar_bytes(n);
    })
    .map_err(|source| CacheError::Io {
        cache: cache.url().to_owned(),
        key: job.nar_key.clone(),
        source,
    })
}

/// Verifies `cache` as `opts` says, handing each problem to `report` as it is found and
/// telling `progress` how far it got. With `opts.contents`, NARs are read by that many
/// threads while the narinfos are still being read.
///
/// # Errors
/// [`CacheError`] when the cache cannot be listed or read ([`CacheError::Config`] for a
/// cache that cannot list at all).
pub fn verify_with(
    cache: &dyn BinaryCache,
    opts: &VerifyOptions,
    progress: &dyn VerifyProgress,
    report: &mut dyn FnMut(Problem),
) -> Result<Summary, CacheError> {
    let mut out = Out {
        summary: Summary::default(),
        report,
    };

    let mut listing = Listing::default();
    if !cache.list_objects(&mut |o| listing.add(o))? {
        return Err(CacheError::Config(format!(
            "{}: this cache cannot be listed, so it cannot be verified",
            cache.url()
        )));
    }
    listing.finish();
    out.summary.nars = listing.nars.len() as u64;
    out.summary.nar_bytes = listing.nars.iter().map(|(_, s)| s).sum();
    let to_read = if opts.contents.is_some() {
        out.summary.nar_bytes
    } else {
        0
    };
    progress.listed(listing.narinfos.len() as u64, to_read);

    let workers = opts.contents.unwrap_or(0);
    // NARs queued for the readers, and checked ones waiting to be reported: twice the
    // readers, so none waits for the next while this thread reads a batch of narinfos
    // (a job is a few hundred bytes; the NARs' memory is the readers').
    let (job_tx, job_rx) = crossbeam_channel::bounded::<NarJob>(workers * 2);
    let (done_tx, done_rx) = crossbeam_channel::bounded(workers * 2);
    let mut error = None;
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (jobs, done) = (job_rx.clone(), done_tx.clone());
            s.spawn(move || {
                for job in jobs {
                    let checked = check_job(cache, &job, progress);
                    if done.send((job, checked)).is_err() {
                        break;
                    }
                }
            });
        }
        drop((job_rx, done_tx));
        let submit = |out: &mut Out, job: NarJob, error: &mut Option<CacheError>| {
            let mut job = Some(job);
            while let Some(j) = job.take() {
                crossbeam_channel::select! {
                    send(job_tx, j) -> r => {
                        r.expect("the readers run until the queue closes");
                    }
                    recv(done_rx) -> r => {
                        let (done, checked) = r.expect("the readers run until the queue closes");
                        out.checked(done, checked, error);
                        job = Some(j);
                    }
                }
            }
        };
        let read = read_narinfos(
            cache,
            opts,
            progress,
            &mut listing,
            &mut out,
            &mut |out, job| submit(out, job, &mut error),
        );
        drop(job_tx);
        for (job, checked) in done_rx.iter() {
            out.checked(job, checked, &mut error);
        }
        if let Err(e) = read {
            error = Some(e);
        }
    });
    if let Some(e) = error {
        return Err(e);
    }

    if opts.paths.is_none() {
        for (key, size) in std::mem::take(&mut listing.leftovers) {
            let detail = format!("left behind by an upload, or one still running ({size} bytes)");
            out.emit(Kind::Leftover, key, detail);
        }
        for u in cache.list_unfinished_uploads()? {
            let detail = format!(
                "multipart upload {} was never completed nor aborted",
                u.upload_id
            );
            out.emit(Kind::UnfinishedUpload, u.key, detail);
        }
    }
    Ok(out.summary)
}

/// Reads and checks the narinfos `opts` asks for against `listing`, handing each NAR to
/// read to `submit` (with `--contents`), then reports the NARs nothing names.
fn read_narinfos(
    cache: &dyn BinaryCache,
    opts: &VerifyOptions,
    progress: &dyn VerifyProgress,
    listing: &mut Listing,
    out: &mut Out,
    submit: &mut dyn FnMut(&mut Out, NarJob),
) -> Result<(), CacheError> {
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
                    out.emit(
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

    while !queue.is_empty() {
        let batch: Vec<[u8; 20]> = queue.drain(..queue.len().min(BATCH)).collect();
        let keys: Vec<String> = batch
            .iter()
            .map(|h| format!("{}.narinfo", nix32::encode(h)))
            .collect();
        let texts = cache.get_texts(&keys)?;
        // Parsing and signature checks (the CPU work) run across the batch in parallel.
        let read: Vec<Option<Read>> = texts
            .par_iter()
            .zip(&batch)
            .map(|(text, h)| text.as_deref().map(|t| read_narinfo(t, h, opts)))
            .collect();
        drop(texts);
        progress.narinfos(batch.len() as u64);
        for ((key, read), h) in keys.into_iter().zip(read).zip(&batch) {
            // Removed since the listing: nothing left to check.
            let Some(read) = read else { continue };
            out.summary.narinfos += 1;
            let n = match read {
                Read::Damaged(kind, detail) => {
                    out.emit(kind, key, detail);
                    continue;
                }
                Read::Parsed(n, signature) => {
                    if let Some((kind, detail)) = signature {
                        out.emit(kind, key.clone(), detail);
                    }
                    n
                }
            };
            match listing.nar(&n.url) {
                None => out.emit(
                    Kind::NarMissing,
                    key.clone(),
                    format!("its NAR {} is not in the cache", n.url),
                ),
                Some(i) => {
                    named[i] = true;
                    let have = listing.nars[i].1;
                    if let Some(want) = n.file_size.filter(|&w| w != have) {
                        out.emit(
                            Kind::NarSize,
                            key.clone(),
                            format!("its NAR {} has {have} bytes, FileSize says {want}", n.url),
                        );
                    } else if opts.contents.is_some() {
                        let job = NarJob {
                            hash: *h,
                            narinfo_key: key.clone(),
                            nar_key: listing.nar_name(&listing.nars[i].0),
                            want: Expected {
                                compression: n.compression.clone(),
                                file_hash: n.file_hash,
                                nar_hash: n.nar_hash,
                                nar_size: n.nar_size,
                            },
                            listing: listing.has_listing(h),
                        };
                        submit(out, job);
                    }
                }
            }
            for r in n.references.iter().filter(|r| **r != n.store_path) {
                let rh = NarinfoSet::key(r);
                if !listing.has_narinfo(&rh) {
                    out.emit(
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
    }

    if opts.paths.is_none() {
        for ((key, size), named) in listing.nars.iter().zip(&named) {
            if !named {
                let detail = format!("no narinfo names it ({size} bytes)");
                out.emit(Kind::OrphanNar, listing.nar_name(key), detail);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
