//! `narflow verify --contents`: one NAR read from the cache and checked against its
//! narinfo, streaming — FileHash over the compressed bytes, then the bytes decompressed
//! (zstd, xz or none, by `Compression:`) and NarHash and NarSize checked over the NAR —
//! and, when the cache has the path's `.ls`, the listing compared with the NAR's own.
//! Also the ceiling those checks cannot beat on this machine: the same work on NARs
//! already in memory.
//!
//! It holds one read buffer and one decoder's window per NAR, never a NAR; it reads the
//! cache and never writes to it.
use super::problem::Kind;
use crate::format::hash::Sha256;
use crate::format::nar::listing::ListingBuilder;
use crate::format::nar::reader::{self, NarReadError, NarVisitor};
use std::io::{self, Read};

/// Bytes read from a NAR at a time (and the copy buffer behind the hashing).
const READ_BUFFER: usize = 256 * 1024;

/// Memory one NAR's check holds at most: the decoder's window (zstd at the levels narflow
/// writes uses up to 8 MiB, xz's default preset 8 MiB), its input buffer and ours, and a
/// `.ls` document of a large path. The number of NARs checked at once is the memory
/// budget divided by this.
pub const MEMORY_PER_NAR: u64 = 16 << 20;

/// What the narinfo says of its NAR.
#[derive(Debug, Clone)]
pub struct Expected {
    /// `Compression:` as the narinfo spells it.
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
}

/// What checking one NAR found, and what it read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The NAR's problems (at most one: the first of FileHash, decoding, NarSize, NarHash
    /// that fails) and its listing's.
    pub problems: Vec<(Kind, String)>,
    /// Compressed bytes read.
    pub file_bytes: u64,
    /// NAR bytes decompressed.
    pub nar_bytes: u64,
}

/// Hashes and counts what is read through it, and keeps the inner reader's error apart
/// from what a decoder above it makes of bad bytes.
struct HashRead<'a, R> {
    inner: R,
    hasher: sha2::Sha256,
    bytes: u64,
    /// The inner reader failed: the cache, not the object.
    failed: Option<(io::ErrorKind, String)>,
    progress: &'a dyn Fn(u64),
}

impl<'a, R: Read> HashRead<'a, R> {
    fn new(inner: R, progress: &'a dyn Fn(u64)) -> Self {
        use sha2::Digest;
        HashRead {
            inner,
            hasher: sha2::Sha256::new(),
            bytes: 0,
            failed: None,
            progress,
        }
    }

    fn finish(self) -> (Sha256, u64) {
        use sha2::Digest;
        (Sha256(self.hasher.finalize().into()), self.bytes)
    }
}

impl<R: Read> Read for HashRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest;
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.bytes += n as u64;
                (self.progress)(n as u64);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed = Some((e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }
}

/// Reads everything left of `r`, hashing it.
fn drain(r: &mut impl Read) -> io::Result<()> {
    let mut buf = vec![0; READ_BUFFER];
    while r.read(&mut buf)? > 0 {}
    Ok(())
}

/// Checks the NAR `source` reads (the object's compressed bytes) against `want`, and
/// `listing` (the path's `.ls`, when the cache has one) against the NAR. `progress` hears
/// of compressed bytes as they are read.
///
/// # Errors
/// The error of `source` itself (the cache could not be read): nothing is known of the
/// object. What is wrong with the bytes is a problem in [`Checked`], never an error.
pub fn check_nar(
    source: &mut dyn Read,
    want: &Expected,
    listing: Option<&[u8]>,
    progress: &dyn Fn(u64),
) -> io::Result<Checked> {
    let mut file = HashRead::new(source, progress);
    let mut nar_problem: Option<(Kind, String)> = None;
    let mut listing_problem: Option<(Kind, String)> = None;
    let mut nar_bytes = 0;
    let decoded = decode(&mut file, want, listing);
    if let Some((kind, message)) = file.failed.take() {
        return Err(io::Error::new(kind, message));
    }
    // Whatever the decoder left (it stopped at bad bytes) still counts for FileHash.
    drain(&mut file)?;
    let (file_hash, file_bytes) = file.finish();
    match decoded {
        Err(why) => nar_problem = Some((Kind::Undecodable, why)),
        Ok((nar_hash, size, listed)) => {
            nar_bytes = size;
            if size != want.nar_size {
                let detail = format!(
                    "it decompresses to {size} bytes, NarSize says {}",
                    want.nar_size
                );
                nar_problem = Some((Kind::NarSizeMismatch, detail));
            } else if nar_hash != want.nar_hash {
                let detail = format!(
                    "its NAR hashes to sha256:{}, NarHash says sha256:{}",
                    nar_hash.to_nix32(),
                    want.nar_hash.to_nix32()
                );
                nar_problem = Some((Kind::NarHash, detail));
            }
            if let (Some(theirs), Some(ours)) = (listing, listed) {
                listing_problem = compare_listing(theirs, &ours);
            }
        }
    }
    if let Some(want_hash) = want.file_hash.filter(|h| *h != file_hash) {
        let consequence = match &nar_problem {
            None => "it still decompresses to the NAR NarHash names".to_owned(),
            Some((_, why)) => why.clone(),
        };
        let detail = format!(
            "its bytes hash to sha256:{}, FileHash says sha256:{} ({consequence})",
            file_hash.to_nix32(),
            want_hash.to_nix32()
        );
        nar_problem = Some((Kind::FileHash, detail));
    }
    Ok(Checked {
        problems: nar_problem.into_iter().chain(listing_problem).collect(),
        file_bytes,
        nar_bytes,
    })
}

/// The NAR's hash and size as `file` decompresses, and (when `listing` is asked for) its
/// listing. `Err` says why the bytes do not decompress, or are not a NAR.
fn decode(
    file: &mut dyn Read,
    want: &Expected,
    listing: Option<&[u8]>,
) -> Result<(Sha256, u64, Option<Vec<u8>>), String> {
    let decoder: Box<dyn Read + '_> = match want.compression.as_str() {
        "zstd" => {
            let d = zstd::stream::read::Decoder::new(file)
                .map_err(|e| format!("cannot start zstd: {e}"))?;
            Box::new(d)
        }
        // Nix and narflow may write several xz streams one after the other.
        "xz" => Box::new(liblzma::read::XzDecoder::new_multi_decoder(file)),
        "none" | "" => Box::new(file),
        other => return Err(format!("unknown Compression {other:?}")),
    };
    let ignore = |_| {};
    let mut nar = HashRead::new(decoder, &ignore);
    let listed = match listing {
        None => {
            drain(&mut nar)
                .map_err(|e| format!("it does not decompress as {}: {e}", want.compression))?;
            None
        }
        Some(_) => {
            let mut v = Lister::default();
            reader::parse(&mut nar, &mut v).map_err(|e| match e {
                NarReadError::Io(e) => {
                    format!("it does not decompress as {}: {e}", want.compression)
                }
                e @ NarReadError::Malformed { .. } => format!("not a NAR: {e}"),
            })?;
            Some(v.finish())
        }
    };
    let (hash, size) = nar.finish();
    Ok((hash, size, listed))
}

/// Builds a NAR's listing from [`reader::parse`]'s nodes (paths from the root).
#[derive(Default)]
struct Lister {
    builder: ListingBuilder,
    /// The entries open below the root, innermost last, and whether each is a directory.
    open: Vec<bool>,
    root_is_directory: bool,
}

impl Lister {
    /// Closes the open entries deeper than `path`'s parent, then opens `path`'s entry.
    fn enter(&mut self, path: &[&[u8]], directory: bool) {
        let depth = path.len().saturating_sub(1);
        while self.open.len() > depth {
            self.close();
        }
        match path.last() {
            Some(name) => {
                self.builder.open_entry(name);
                self.open.push(directory);
            }
            None => self.root_is_directory = directory,
        }
    }

    fn close(&mut self) {
        if self.open.pop() == Some(true) {
            self.builder.close_directory();
        }
        self.builder.close_entry();
    }

    fn finish(mut self) -> Vec<u8> {
        while !self.open.is_empty() {
            self.close();
        }
        if self.root_is_directory {
            self.builder.close_directory();
        }
        self.builder.finish().json().to_vec()
    }
}

impl NarVisitor for Lister {
    fn directory(&mut self, path: &[&[u8]]) -> io::Result<()> {
        self.enter(path, true);
        self.builder.open_directory();
        Ok(())
    }
    fn symlink(&mut self, path: &[&[u8]], target: &[u8]) -> io::Result<()> {
        self.enter(path, false);
        self.builder.symlink(target);
        Ok(())
    }
    fn regular(
        &mut self,
        path: &[&[u8]],
        executable: bool,
        size: u64,
        _contents: &mut dyn Read,
    ) -> io::Result<()> {
        self.enter(path, false);
        self.builder.regular(executable, size);
        Ok(())
    }
}

/// What is wrong with the cache's listing `theirs` of a NAR whose own listing (as Nix
/// writes it) is `ours`: it does not parse, or describes another tree. A listing written
/// differently (key order, whitespace, no `narOffset`) but describing the same tree is
/// right.
fn compare_listing(theirs: &[u8], ours: &[u8]) -> Option<(Kind, String)> {
    if theirs == ours {
        return None;
    }
    let parsed: serde_json::Value = match serde_json::from_slice(theirs) {
        Ok(v) => v,
        Err(e) => return Some((Kind::UnparsableListing, format!("it is not JSON: {e}"))),
    };
    if parsed.get("version").and_then(serde_json::Value::as_u64) != Some(1) {
        return Some((
            Kind::UnparsableListing,
            "it is not a version 1 listing".into(),
        ));
    }
    let Some(root) = parsed.get("root") else {
        return Some((Kind::UnparsableListing, "it has no root".into()));
    };
    // Ours is JSON unless a name is not UTF-8 (then theirs, being JSON, differs anyway).
    let Ok(ours) = serde_json::from_slice::<serde_json::Value>(ours) else {
        return Some((
            Kind::ListingMismatch,
            "it does not describe the NAR's tree".into(),
        ));
    };
    match same_node(root, &ours["root"], &mut String::new()) {
        Ok(()) => None,
        Err(why) => Some((Kind::ListingMismatch, why)),
    }
}

/// Whether the listing node `theirs` describes `ours` (the NAR's); `at` is its path.
fn same_node(
    theirs: &serde_json::Value,
    ours: &serde_json::Value,
    at: &mut String,
) -> Result<(), String> {
    let field = |v: &serde_json::Value, k: &str| v.get(k).cloned();
    let here = |at: &str| {
        if at.is_empty() {
            "/".to_owned()
        } else {
            at.to_owned()
        }
    };
    let kind = field(theirs, "type");
    if kind != field(ours, "type") {
        return Err(format!("{}: its type differs from the NAR's", here(at)));
    }
    match ours["type"].as_str() {
        Some("regular") => {
            let executable = |v: &serde_json::Value| {
                v.get("executable")
                    .and_then(|e| e.as_bool())
                    .unwrap_or(false)
            };
            if field(theirs, "size") != field(ours, "size")
                || executable(theirs) != executable(ours)
            {
                return Err(format!(
                    "{}: size or executable bit differs from the NAR's",
                    here(at)
                ));
            }
            if let Some(offset) = theirs.get("narOffset")
                && Some(offset) != ours.get("narOffset")
            {
                return Err(format!("{}: narOffset differs from the NAR's", here(at)));
            }
            Ok(())
        }
        Some("symlink") if field(theirs, "target") == field(ours, "target") => Ok(()),
        Some("symlink") => Err(format!("{}: target differs from the NAR's", here(at))),
        _ => {
            let empty = serde_json::Map::new();
            let entries =
                |v: &serde_json::Value| v.get("entries").and_then(|e| e.as_object()).cloned();
            let (Some(t), o) = (entries(theirs), entries(ours).unwrap_or(empty)) else {
                return Err(format!("{}: a directory without entries", here(at)));
            };
            if t.len() != o.len() || t.keys().any(|k| !o.contains_key(k)) {
                return Err(format!("{}: its entries differ from the NAR's", here(at)));
            }
            for (name, node) in &o {
                let len = at.len();
                at.push('/');
                at.push_str(name);
                same_node(&t[name], node, at)?;
                at.truncate(len);
            }
            Ok(())
        }
    }
}

/// The ceiling of `verify --contents` on this machine: decompression and hashing alone,
/// on NARs already in memory, spread over a pool of threads as verify spreads NARs.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceiling {
    pub threads: usize,
    pub nars: usize,
    /// Compressed bytes and NAR bytes of the sample.
    pub file_bytes: u64,
    pub nar_bytes: u64,
    /// The best pass.
    pub seconds: f64,
    /// NAR bytes per second of the best pass, in MB/s.
    pub nar_mb_per_s: f64,
}

/// Checks every NAR of `sample` (its narinfo's claims and its compressed bytes) `passes`
/// times on a pool of `threads`, the same check verify makes of a NAR it reads from a
/// cache; the best pass counts.
///
/// # Errors
/// When the thread pool cannot start.
pub fn measure_ceiling(
    sample: &[(Expected, Vec<u8>)],
    threads: usize,
    passes: usize,
) -> io::Result<Ceiling> {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| io::Error::other(format!("starting threads: {e}")))?;
    let mut best: Option<(f64, u64, u64)> = None;
    for _ in 0..passes.max(1) {
        let started = std::time::Instant::now();
        let read: io::Result<(u64, u64)> = pool.install(|| {
            sample
                .par_iter()
                .map(|(want, bytes)| {
                    let c = check_nar(&mut &bytes[..], want, None, &|_| {})?;
                    Ok((c.file_bytes, c.nar_bytes))
                })
                .try_reduce(|| (0, 0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))
        });
        let seconds = started.elapsed().as_secs_f64();
        let (file_bytes, nar_bytes) = read?;
        if best.is_none_or(|(s, _, _)| seconds < s) {
            best = Some((seconds, file_bytes, nar_bytes));
        }
    }
    let (seconds, file_bytes, nar_bytes) = best.unwrap_or_default();
    Ok(Ceiling {
        threads: pool.current_num_threads(),
        nars: sample.len(),
        file_bytes,
        nar_bytes,
        seconds,
        nar_mb_per_s: if seconds > 0.0 {
            nar_bytes as f64 / 1e6 / seconds
        } else {
            0.0
        },
    })
}

/// Up to `limit` bytes of `cache`'s NARs, read into memory with what their narinfos say
/// of them: the sample [`measure_ceiling`] checks. Narinfos that do not parse, or whose
/// NAR is missing, are passed over.
///
/// # Errors
/// [`CacheError`] when the cache cannot be listed or read.
pub fn load_sample(
    cache: &dyn crate::cache::BinaryCache,
    store_dir: &str,
    limit: u64,
) -> Result<Vec<(Expected, Vec<u8>)>, crate::cache::CacheError> {
    let mut keys = Vec::new();
    cache.list_objects(&mut |o| {
        if o.key.ends_with(".narinfo") && !o.key.contains('/') {
            keys.push(o.key.to_owned());
        }
    })?;
    let mut sample = Vec::new();
    let mut bytes = 0;
    for batch in keys.chunks(super::problem::BATCH) {
        for text in cache.get_texts(batch)?.into_iter().flatten() {
            let Ok(n) = crate::format::narinfo::NarInfo::parse(&text, store_dir) else {
                continue;
            };
            let Some(mut r) = cache.read_object(&n.url)? else {
                continue;
            };
            let mut file = Vec::new();
            r.read_to_end(&mut file)
                .map_err(|source| crate::cache::CacheError::Io {
                    cache: cache.url().to_owned(),
                    key: n.url.clone(),
                    source,
                })?;
            bytes += file.len() as u64;
            let want = Expected {
                compression: n.compression,
                file_hash: n.file_hash,
                nar_hash: n.nar_hash,
                nar_size: n.nar_size,
            };
            sample.push((want, file));
            if bytes >= limit {
                return Ok(sample);
            }
        }
    }
    Ok(sample)
}

#[cfg(test)]
mod tests;
