//! Pushing store paths to a binary cache: plan (closure, order, skip what the cache has),
//! upload each NAR, then publish narinfos in durable waves that keep Nix's closure
//! invariant. This module decides what goes up and in which order; formats live in
//! `format`, destinations in `cache`.
//!
//! Invariants, in the order a path goes through them:
//! 1. its NAR is streamed once: NAR → NarHash → compressor → FileHash → cache upload;
//! 2. a NarHash or NarSize that differs from the store's refuses the path (corrupt store),
//!    and the upload is aborted, so nothing is published for it;
//! 3. its narinfo is written only after a `sync` that makes its NAR durable, and only once
//!    the narinfos of all its references are durable (or were in the cache already).

pub mod compress;
pub mod publish;

use crate::cache::BinaryCache;
use crate::format::hash::{HashingWriter, Sha256};
use crate::format::nar::writer::dump_path;
use crate::format::narinfo::NarInfo;
use crate::format::signing::SigningKey;
use crate::format::store_path::StorePath;
use crate::store::{LocalStore, PathInfo, StoreError};
use compress::{CompressionSettings, Encoder};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// NAR bytes read per write into the hashing/compression chain. NAR writing already
/// buffers file contents; this only coalesces the small framing tokens.
const NAR_BUFFER: usize = 256 * 1024;

/// How many uploaded paths wait for their narinfo before a publish wave. Each wave costs
/// one `sync` per closure level, so this trades sync calls against how much finished work
/// a crash can lose (the NARs stay, only their narinfos are written again next time).
const PUBLISH_BATCH: usize = 512;

/// What to push and how.
#[derive(Debug)]
pub struct PushOptions {
    pub compression: CompressionSettings,
    /// Our signatures are added to the ones the store has. Empty means unsigned (the CLI
    /// only allows that with `--unsigned`).
    pub keys: Vec<SigningKey>,
    /// Push the closure of the requested paths (default), or only the paths themselves
    /// (their references must then already be in the cache).
    pub closure: bool,
}

/// What happened to one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Uploaded {
        nar_size: u64,
        file_size: u64,
    },
    /// Its narinfo was in the cache already.
    AlreadyPresent,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct PathResult {
    /// The full path as the user would name it.
    pub path: String,
    pub outcome: Outcome,
}

/// The result of a push: one entry per path considered, in processing order.
#[derive(Debug, Default)]
pub struct PushReport {
    pub results: Vec<PathResult>,
    pub nar_bytes: u64,
    pub file_bytes: u64,
    pub elapsed: Duration,
}

impl PushReport {
    pub fn failed(&self) -> impl Iterator<Item = &PathResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
    }
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }
}

/// Receives progress from a push. Called from the pushing thread.
pub trait Progress: Send + Sync {
    /// The plan: how many paths will be uploaded and their total NAR size.
    fn planned(&self, _paths: usize, _nar_bytes: u64) {}
    /// A path finished (uploaded, skipped or failed).
    fn finished(&self, _result: &PathResult) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Errors that stop a whole push (per-path failures are in [`PushReport`] instead).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Resolves a command-line argument to the store path it names: a store path, a path
/// inside one (`/nix/store/...-hello/bin/hello`), or a symlink to one (`./result`).
///
/// # Errors
/// A message naming the argument: missing, or outside the store.
pub fn resolve_argument(arg: &str, store_dir: &str) -> Result<StorePath, String> {
    let direct = StorePath::from_absolute_path_prefix(arg, store_dir);
    let path = match direct {
        Ok(p) => p,
        Err(_) => {
            let real = std::fs::canonicalize(arg).map_err(|e| format!("{arg}: {e}"))?;
            let real = real
                .to_str()
                .ok_or_else(|| format!("{arg}: not a UTF-8 path"))?;
            StorePath::from_absolute_path_prefix(real, store_dir)
                .map_err(|e| format!("{arg}: {e}"))?
        }
    };
    let full = path.to_absolute(store_dir);
    match std::fs::symlink_metadata(&full) {
        Ok(_) => Ok(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{full}: no such store path"))
        }
        Err(e) => Err(format!("{full}: {e}")),
    }
}

/// Pushes `paths` (and, with `opts.closure`, everything they reference) to `cache`.
///
/// # Errors
/// [`PushError`] when the run cannot go on at all (cache unusable, store unreadable);
/// a path that fails is reported in the [`PushReport`] and the rest go on.
pub fn push(
    store: &LocalStore,
    cache: &dyn BinaryCache,
    paths: &[StorePath],
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let store_dir = store.store_dir().to_owned();
    let mut report = PushReport::default();
    let record = |report: &mut PushReport, path: String, outcome: Outcome| {
        let r = PathResult { path, outcome };
        progress.finished(&r);
        report.results.push(r);
    };

    cache.ensure_cache_info(&store_dir)?;
    let (valid, invalid) = split_valid(store, paths)?;
    for (path, why) in invalid {
        record(&mut report, path, Outcome::Failed(why));
    }
    let infos = if opts.closure {
        store.closure(&valid)?
    } else {
        crate::store::closure::topo_sort(store.path_infos(&valid)?)
    };

    let mut todo = Vec::with_capacity(infos.len());
    for info in infos {
        if cache.has_narinfo(&info.path)? {
            record(
                &mut report,
                info.path.to_absolute(&store_dir),
                Outcome::AlreadyPresent,
            );
        } else {
            todo.push(info);
        }
    }
    progress.planned(todo.len(), todo.iter().map(|i| i.nar_size).sum());

    // Paths whose narinfo is (or will be) published by this run, for the reference check.
    let planned: HashSet<StorePath> = todo.iter().map(|i| i.path.clone()).collect();
    let mut failed: HashSet<StorePath> = HashSet::new();
    let mut publisher = publish::Publisher::new(cache, &store_dir);
    for info in &todo {
        let full = info.path.to_absolute(&store_dir);
        let outcome = match check_references(cache, info, &planned, &failed, &store_dir)
            .and_then(|()| upload_one(cache, &store_dir, info, opts))
        {
            Ok((narinfo, file_size)) => {
                report.nar_bytes += info.nar_size;
                report.file_bytes += file_size;
                publisher.add(narinfo);
                Outcome::Uploaded {
                    nar_size: info.nar_size,
                    file_size,
                }
            }
            Err(why) => {
                failed.insert(info.path.clone());
                Outcome::Failed(why)
            }
        };
        record(&mut report, full, outcome);
        if publisher.pending() >= PUBLISH_BATCH {
            publisher.publish_all()?;
        }
    }
    publisher.publish_all()?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Splits `paths` into those valid in the store and those that are not (with the reason).
fn split_valid(
    store: &LocalStore,
    paths: &[StorePath],
) -> Result<(Vec<StorePath>, Vec<(String, String)>), StoreError> {
    let mut valid: Vec<StorePath> = paths.to_vec();
    valid.sort();
    valid.dedup();
    let mut invalid = Vec::new();
    loop {
        match store.path_infos(&valid) {
            Ok(_) => return Ok((valid, invalid)),
            Err(StoreError::NotValid(full)) => {
                let before = valid.len();
                valid.retain(|p| p.to_absolute(store.store_dir()) != full);
                if valid.len() == before {
                    return Err(StoreError::NotValid(full));
                }
                invalid.push((
                    full.clone(),
                    format!("{full} is not a valid path in the Nix store"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A path may go up only if each reference is itself going up (and has not failed) or is
/// already in the cache.
fn check_references(
    cache: &dyn BinaryCache,
    info: &PathInfo,
    planned: &HashSet<StorePath>,
    failed: &HashSet<StorePath>,
    store_dir: &str,
) -> Result<(), String> {
    for r in info.references.iter().filter(|r| **r != info.path) {
        if failed.contains(r) {
            return Err(format!("its reference {} failed", r.to_absolute(store_dir)));
        }
        if !planned.contains(r) && !cache.has_narinfo(r).map_err(|e| e.to_string())? {
            return Err(format!(
                "its reference {} is not in the cache (push without --no-closure)",
                r.to_absolute(store_dir)
            ));
        }
    }
    Ok(())
}

/// Streams one path's NAR into the cache and returns its (signed) narinfo and file size.
fn upload_one(
    cache: &dyn BinaryCache,
    store_dir: &str,
    info: &PathInfo,
    opts: &PushOptions,
) -> Result<(NarInfo, u64), String> {
    let full = info.path.to_absolute(store_dir);
    let upload = cache.begin_nar().map_err(|e| e.to_string())?;
    let file_hashing = HashingWriter::new(upload);
    let encoder =
        Encoder::new(opts.compression, file_hashing).map_err(|e| format!("compressor: {e}"))?;
    let mut nar = std::io::BufWriter::with_capacity(NAR_BUFFER, HashingWriter::new(encoder));
    dump_path(Path::new(&full), &mut nar).map_err(|e| e.to_string())?;
    let nar_hashing = nar
        .into_inner()
        .map_err(|e| format!("{full}: {}", e.error()))?;
    let (encoder, nar_hash, nar_size) = nar_hashing.finish();
    let file_hashing = encoder.finish().map_err(|e| format!("{full}: {e}"))?;
    let (mut upload, file_hash, file_size) = file_hashing.finish();
    if nar_hash != info.nar_hash || nar_size != info.nar_size {
        // `upload` is dropped here without commit: the NAR is aborted.
        return Err(corrupt_message(&full, info, nar_hash, nar_size));
    }
    upload.flush().map_err(|e| format!("{full}: {e}"))?;
    let url = format!(
        "nar/{}{}",
        file_hash.to_nix32(),
        opts.compression.kind.extension()
    );
    if cache.has_object(&url).map_err(|e| e.to_string())? {
        drop(upload); // same FileHash: the object there is this very file
    } else {
        upload.commit(&url).map_err(|e| e.to_string())?;
    }
    let mut narinfo = NarInfo {
        store_path: info.path.clone(),
        url,
        compression: opts.compression.kind.nix_name().to_owned(),
        file_hash: Some(file_hash),
        file_size: Some(file_size),
        nar_hash,
        nar_size,
        references: info.references.clone(),
        deriver: info.deriver.clone(),
        sigs: info.sigs.clone(),
        ca: info.ca.clone(),
    };
    let fingerprint = narinfo.fingerprint(store_dir);
    for key in &opts.keys {
        let sig = key.sign(&fingerprint);
        if !narinfo.sigs.contains(&sig) {
            narinfo.sigs.push(sig);
        }
    }
    Ok((narinfo, file_size))
}

fn corrupt_message(full: &str, info: &PathInfo, nar_hash: Sha256, nar_size: u64) -> String {
    format!(
        "{full} is corrupt: its contents hash to {nar_hash} ({nar_size} bytes) but the Nix database \
         records {} ({} bytes); not uploaded (repair it with `nix-store --repair-path {full}`)",
        info.nar_hash, info.nar_size
    )
}
