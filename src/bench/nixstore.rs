//! `narflow bench make-store`: a generated store of many small paths that reference each
//! other, made in the real `/nix/store` and registered with Nix, for backfill and
//! watch-store benchmarks and tests.
//!
//! Owns the store's plan (names, references, sizes and registration order, all from the
//! tag and the parameters), writing the paths, registering them with
//! `nix-store --register-validity --hash-given`, and the manifest that makes a second run
//! on the same machine a cheap validity check instead of a remake. It writes only paths
//! named `bf-<tag>-<index>`, never touches another store path, and never deletes a valid
//! path.
//!
//! Facts of Nix 2.8 this relies on (checked against the installed `nix-store`):
//! - one `--register-validity` call reads all its input, then registers the paths in
//!   store-path order (a `std::map`), not input order; `ValidPaths.id` follows that order.
//!   So the hash part of each path begins with two nix32 digits giving its place in its
//!   batch (the alphabet is in ASCII order), and batch by batch the ids follow the plan's
//!   registration order exactly;
//! - within one call a path may be registered before its references (references are added
//!   after every path of the call), across calls a reference must already be valid: a
//!   path registered before one of its references is always in the same batch as it;
//! - Nix never checks that an input-addressed path's hash part matches its contents, and
//!   `--hash-given` takes the NarHash (base16) and NarSize given instead of hashing again.
//!
//! The input format of `--register-validity --hash-given`, one block per path: the full
//! path, the NarHash, the NarSize, the deriver (empty line for none), the number of
//! references, then one full reference path per line.

use super::*;
use crate::format::nix32;
use crate::store::StoreError;
use crate::store::db::StoreDb;
use rayon::prelude::*;
use std::io::Read;
use std::ops::Range;
use std::process::{Child, Command, Stdio};

/// The store the paths are made in.
pub const NIX_STORE_DIR: &str = "/nix/store";

/// Nix's database, read to check which paths are valid.
pub const NIX_DB: &str = "/nix/var/nix/db/db.sqlite";

/// Where manifests are kept: beside Nix's own state, so they live as long as the store.
pub const DEFAULT_MANIFEST_DIR: &str = "/nix/var/narflow-bench";

/// Default number of earlier paths each path may refer to.
pub const DEFAULT_REFS: usize = 3;

/// Paths per `nix-store --register-validity` call: large enough that spawning `nix-store`
/// and committing its transaction cost little per path, small enough that the two-digit
/// nix32 place (at most 1,024) always fits, with room for one extra path (see
/// [`StorePlan::batches`]).
const BATCH: usize = 1000;

/// Bytes of text in a tiny path, after its references.
const TINY_TEXT: usize = 64;

/// Version of the generator: part of every hash part, so a changed generator makes new
/// paths instead of finding old ones with other contents valid.
const STORE_GENERATOR_VERSION: u32 = 1;

/// Limits of the parameters, so a typo does not fill the disk or make names Nix refuses.
pub const MAX_PATHS: usize = 10_000_000;
pub const MAX_REFS: usize = 64;
/// At most every other path can be registered before its previous one.
pub const MAX_DISORDER: u32 = 500;
const MAX_TAG_LEN: usize = 64;

/// What to make: the same spec makes the same store (names, contents, references and
/// order) on every machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSpec {
    /// Part of every name (`bf-<tag>-<index>`) and of the manifest's file name.
    pub tag: String,
    /// How many paths.
    pub paths: usize,
    /// Each path refers to up to this many earlier ones.
    pub refs: usize,
    /// Per thousand paths, how many are registered before one of their references.
    pub disorder_permille: u32,
    /// Each path one small regular file (its references and a little text) instead of a
    /// tree: one inode and one block a path, for stores of a million paths.
    pub tiny: bool,
}

impl StoreSpec {
    /// Checks the parameters.
    ///
    /// # Errors
    /// A message naming the parameter and what is wrong with it.
    pub fn check(&self) -> Result<(), String> {
        let tag_ok = !self.tag.is_empty()
            && self.tag.len() <= MAX_TAG_LEN
            && !self.tag.starts_with(['.', '-'])
            && self
                .tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(format!(
                "--tag {:?}: expected 1 to {MAX_TAG_LEN} letters, digits, '.', '_' or '-', \
                 not starting with '.' or '-' (it becomes part of store path names)",
                self.tag
            ));
        }
        if self.paths == 0 || self.paths > MAX_PATHS {
            return Err(format!("--paths {}: expected 1 to {MAX_PATHS}", self.paths));
        }
        if self.refs > MAX_REFS {
            return Err(format!("--refs {}: expected 0 to {MAX_REFS}", self.refs));
        }
        if self.disorder_permille > MAX_DISORDER {
            return Err(format!(
                "--disorder {}: expected 0 to {MAX_DISORDER} (per thousand paths; a path \
                 registered early needs a neighbour that is not)",
                self.disorder_permille
            ));
        }
        if self.disorder_permille > 0 && self.refs == 0 {
            return Err(format!(
                "--disorder {} needs references (--refs 0 was given)",
                self.disorder_permille
            ));
        }
        Ok(())
    }

    /// The manifest's file name: `<tag>-<paths>.paths` (`<tag>-<paths>-tiny.paths`).
    pub fn manifest_name(&self) -> String {
        let tiny = if self.tiny { "-tiny" } else { "" };
        format!("{}-{}{tiny}.paths", self.tag, self.paths)
    }

    /// Everything the hash parts and contents are derived from.
    fn key(&self) -> String {
        let tiny = if self.tiny { ":tiny" } else { "" };
        format!(
            "narflow-bench-store:{STORE_GENERATOR_VERSION}:{}:{}:{}:{}{tiny}",
            self.tag, self.paths, self.refs, self.disorder_permille
        )
    }
}

/// One planned path.
#[derive(Debug, Clone)]
pub struct PlannedPath {
    pub path: StorePath,
    /// Sorted; may contain `path` itself (a self-reference, as many real paths have).
    pub references: Vec<StorePath>,
    /// A `.drv` path that is never made valid (as in stores whose derivations were
    /// collected).
    pub deriver: StorePath,
    /// Bytes of text in the path's README (the other files are a few dozen bytes).
    text_bytes: u64,
    rng: Rng,
}

/// The whole store: paths by index (references always to lower indices or itself), and
/// the order they are registered in.
#[derive(Debug)]
pub struct StorePlan {
    /// Paths are single files ([`StoreSpec::tiny`]).
    pub tiny: bool,
    /// By index: `paths[i]` is `bf-<tag>-<i>`.
    pub paths: Vec<PlannedPath>,
    /// Indices in registration order.
    pub order: Vec<usize>,
    /// Ranges of `order`, one `--register-validity` call each.
    pub batches: Vec<Range<usize>>,
    /// Indices of the paths registered just before their reference `index - 1`.
    pub disordered: Vec<usize>,
    vocab: Vocab,
}

/// The place of a path in its batch (below 1,024) as two nix32 digits: the last two of
/// its 16-bit nix32 encoding (the first two are `0`), which sort like the numbers since
/// the alphabet is in ASCII order.
fn place_digits(place: usize) -> [u8; 2] {
    debug_assert!(place < 1024);
    let digits = nix32::encode(&(place as u16).to_le_bytes());
    let d = digits.as_bytes();
    [d[2], d[3]]
}

/// Plans the store of `spec` (which must pass [`StoreSpec::check`]).
pub fn plan_store(spec: &StoreSpec) -> StorePlan {
    let key = spec.key();
    let seed = Sha256::digest(key.as_bytes()).0;
    let mut rng = Rng::new(u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")));
    let vocab = Vocab::new(&mut rng);
    let n = spec.paths;

    // Which paths go before their previous one: one in each of `m` equal blocks, never a
    // block's first, so no two are neighbours and the previous one is never moved itself.
    let m = n * spec.disorder_permille as usize / 1000;
    let mut disordered = Vec::with_capacity(m);
    if let Some(block) = n.checked_div(m) {
        for b in 0..m {
            disordered.push(b * block + 1 + rng.below(block as u64 - 1) as usize);
        }
    }
    let mut is_disordered = vec![false; n];
    for &i in &disordered {
        is_disordered[i] = true;
    }

    let mut order: Vec<usize> = (0..n).collect();
    for &i in &disordered {
        order.swap(i - 1, i);
    }
    // A batch one longer where a cut would separate a swapped pair (positions i-1 and i).
    let mut batches = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = (start + BATCH).min(n);
        if end < n && is_disordered[end] {
            end += 1;
        }
        batches.push(start..end);
        start = end;
    }
    let mut place = vec![0usize; n];
    for b in &batches {
        for p in b.clone() {
            place[order[p]] = p - b.start;
        }
    }

    let name_of = |i: usize| format!("bf-{}-{i}", spec.tag);
    let store_path = |i: usize, suffix: &str| {
        let digest = Sha256::digest(format!("{key}:{i}{suffix}").as_bytes());
        let mut hash = place_digits(place[i]).to_vec();
        hash.extend_from_slice(&nix32::encode(&digest.0[..20]).as_bytes()[2..]);
        let hash = String::from_utf8(hash).expect("nix32 is ASCII");
        StorePath::from_base_name(&format!("{hash}-{}{suffix}", name_of(i)))
            .expect("generated names are valid")
    };

    let mut paths: Vec<PlannedPath> = Vec::with_capacity(n);
    for (i, &early) in is_disordered.iter().enumerate() {
        let mut prng = rng.fork();
        let mut refs: Vec<usize> = Vec::new();
        if i > 0 {
            let mut want = prng.below(spec.refs as u64 + 1) as usize;
            if early {
                refs.push(i - 1);
                want = want.max(1);
            }
            // Often one of the first few paths (the "glibc" of the store), else any earlier
            // one; a few draws more than wanted, as repeats are dropped.
            for _ in 0..want * 4 {
                if refs.len() >= want.min(i) {
                    break;
                }
                let r = if prng.percent(50) {
                    prng.below(i.min(8) as u64)
                } else {
                    prng.below(i as u64)
                } as usize;
                if !refs.contains(&r) {
                    refs.push(r);
                }
            }
        }
        let mut references: Vec<StorePath> = refs.iter().map(|&r| paths[r].path.clone()).collect();
        let path = store_path(i, "");
        if prng.percent(25) {
            references.push(path.clone());
        }
        references.sort();
        paths.push(PlannedPath {
            deriver: store_path(i, ".drv"),
            path,
            references,
            text_bytes: prng.log_uniform(256, 6 << 10),
            rng: prng,
        });
    }
    StorePlan {
        tiny: spec.tiny,
        paths,
        order,
        batches,
        disordered,
        vocab,
    }
}

/// What [`make_store`] did.
#[derive(Debug, Clone)]
pub struct MadeStore {
    /// The manifest: one full store path per line, in registration order.
    pub manifest: PathBuf,
    /// Every path of a matching manifest was still valid: nothing was made.
    pub reused: bool,
    /// Paths written and registered now.
    pub registered: usize,
    /// Paths of the plan that were valid already (left as they are).
    pub already_valid: usize,
    /// Paths registered before one of their references.
    pub disordered: usize,
    pub seconds: f64,
}

fn command_error(reason: String) -> BenchError {
    BenchError::Command {
        command: "nix-store --register-validity --hash-given",
        reason,
    }
}

/// Makes the store of `spec` (which must pass [`StoreSpec::check`]) in `/nix/store`, or
/// finds it made: when `manifest_dir` holds its manifest and every path in it is valid,
/// nothing is written. Otherwise the paths not valid are written (an invalid leftover
/// directory of the same name is removed first) and registered, batch by batch, and the
/// manifest is written last. Needs write access to the store and its database (root).
///
/// # Errors
/// [`BenchError::Io`] naming the file that cannot be written or removed,
/// [`BenchError::Store`] when the database cannot be read, [`BenchError::Command`] when
/// `nix-store` cannot run or refuses a batch.
pub fn make_store(spec: &StoreSpec, manifest_dir: &Path) -> Result<MadeStore, BenchError> {
    let started = Instant::now();
    let plan = plan_store(spec);
    let manifest = manifest_dir.join(spec.manifest_name());
    let in_order: Vec<StorePath> = plan
        .order
        .iter()
        .map(|&i| plan.paths[i].path.clone())
        .collect();
    let db = StoreDb::open(NIX_STORE_DIR, Path::new(NIX_DB)).map_err(BenchError::Store)?;

    if manifest_matches(&manifest, &in_order)? && all_valid(&db, &in_order)? {
        return Ok(MadeStore {
            manifest,
            reused: true,
            registered: 0,
            already_valid: in_order.len(),
            disordered: plan.disordered.len(),
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    let valid = valid_flags(&db, &in_order)?;
    drop(db);
    let already_valid = valid.iter().filter(|&&v| v).count();
    let mut registered = 0;
    let mut running: Option<(Child, usize)> = None;
    for batch in &plan.batches {
        let todo: Vec<usize> = batch.clone().filter(|&p| !valid[p]).collect();
        // Written and hashed while the previous batch registers.
        let infos = todo
            .par_iter()
            .map(|&p| write_path(&plan, plan.order[p]))
            .collect::<Result<Vec<PathInfo>, BenchError>>()?;
        // References in this batch need the earlier batches valid first.
        if let Some((child, n)) = running.take() {
            finish_registration(child)?;
            registered += n;
        }
        if !infos.is_empty() {
            running = Some((start_registration(&infos)?, infos.len()));
        }
    }
    if let Some((child, n)) = running.take() {
        finish_registration(child)?;
        registered += n;
    }

    fs::create_dir_all(manifest_dir).map_err(io_error(manifest_dir))?;
    let tmp = manifest.with_extension("paths.tmp");
    let mut text = String::with_capacity(in_order.len() * 64);
    for p in &in_order {
        text.push_str(&p.to_absolute(NIX_STORE_DIR));
        text.push('\n');
    }
    fs::write(&tmp, text).map_err(io_error(&tmp))?;
    fs::rename(&tmp, &manifest).map_err(io_error(&manifest))?;
    Ok(MadeStore {
        manifest,
        reused: false,
        registered,
        already_valid,
        disordered: plan.disordered.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// True when `manifest` lists exactly `paths` (a missing manifest is no match).
fn manifest_matches(manifest: &Path, paths: &[StorePath]) -> Result<bool, BenchError> {
    let text = match fs::read_to_string(manifest) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error(manifest)(e)),
    };
    let mut lines = text.lines();
    let same = paths
        .iter()
        .all(|p| lines.next() == Some(p.to_absolute(NIX_STORE_DIR).as_str()));
    Ok(same && lines.next().is_none())
}

/// Paths per validity query: one read transaction each, kept short (the database reader's
/// rule: a long reader holds back Nix's checkpoints).
const QUERY_CHUNK: usize = 1000;

fn all_valid(db: &StoreDb, paths: &[StorePath]) -> Result<bool, BenchError> {
    for chunk in paths.chunks(QUERY_CHUNK) {
        match db.path_infos(chunk) {
            Ok(_) => {}
            Err(StoreError::NotValid(_)) => return Ok(false),
            Err(e) => return Err(BenchError::Store(e)),
        }
    }
    Ok(true)
}

/// Whether each of `paths` is valid: a chunk at a time, one path at a time only in the
/// chunks that are not all valid.
fn valid_flags(db: &StoreDb, paths: &[StorePath]) -> Result<Vec<bool>, BenchError> {
    let mut flags = Vec::with_capacity(paths.len());
    for chunk in paths.chunks(QUERY_CHUNK) {
        match db.path_infos(chunk) {
            Ok(_) => flags.extend(std::iter::repeat_n(true, chunk.len())),
            Err(StoreError::NotValid(_)) => {
                for p in chunk {
                    match db.path_infos(std::slice::from_ref(p)) {
                        Ok(_) => flags.push(true),
                        Err(StoreError::NotValid(_)) => flags.push(false),
                        Err(e) => return Err(BenchError::Store(e)),
                    }
                }
            }
            Err(e) => return Err(BenchError::Store(e)),
        }
    }
    Ok(flags)
}

/// Writes path `i` of the plan into the store and returns the info to register.
fn write_path(plan: &StorePlan, i: usize) -> Result<PathInfo, BenchError> {
    let planned = &plan.paths[i];
    let root = Path::new(NIX_STORE_DIR).join(planned.path.base_name());
    if fs::symlink_metadata(&root).is_ok() {
        // Not valid (only invalid paths are written): a leftover of an interrupted run.
        remove_tree(&root)?;
    }
    let name = planned.path.name();
    let full = planned.path.to_absolute(NIX_STORE_DIR);
    let mentioned: Vec<String> = planned
        .references
        .iter()
        .map(|r| r.to_absolute(NIX_STORE_DIR))
        .collect();
    let mut rng = planned.rng.clone();
    if plan.tiny {
        let mut bytes = mentioned.join(" ").into_bytes();
        bytes.push(b'\n');
        let ctx = TreeCtx {
            vocab: &plan.vocab,
            pkg: name,
            refs: &[],
        };
        let mut words = Vec::new();
        text(&mut words, TINY_TEXT, &mut rng, &ctx);
        words.truncate(TINY_TEXT);
        bytes.extend_from_slice(&words);
        write_mode(&root, &bytes, 0o444)?;
        return Ok(PathInfo::of_tree(
            planned.path.clone(),
            &root,
            planned.references.clone(),
            Some(planned.deriver.clone()),
        )?);
    }
    let ctx = TreeCtx {
        vocab: &plan.vocab,
        pkg: name,
        refs: &mentioned,
    };

    let doc = root.join("share/doc").join(name);
    mkdir(&doc)?;
    let mut readme = Vec::new();
    text(&mut readme, planned.text_bytes as usize, &mut rng, &ctx);
    readme.truncate(planned.text_bytes as usize);
    write_mode(&doc.join("README"), &readme, 0o444)?;
    if rng.percent(10) {
        symlink("README", &doc.join("LICENSE"))?;
    }
    // Every reference written out whole, as Nix's scanner would find it.
    let others: Vec<&str> = mentioned
        .iter()
        .filter(|m| **m != full)
        .map(String::as_str)
        .collect();
    if !others.is_empty() {
        let support = root.join("nix-support");
        mkdir(&support)?;
        let listed = format!("{}\n", others.join(" "));
        write_mode(
            &support.join("propagated-build-inputs"),
            listed.as_bytes(),
            0o444,
        )?;
    }
    if mentioned.contains(&full) {
        let bin = root.join("bin");
        mkdir(&bin)?;
        let script = format!("#!/bin/sh\nexec cat {full}/share/doc/{name}/README\n");
        write_mode(&bin.join(name), script.as_bytes(), 0o555)?;
    }
    Ok(PathInfo::of_tree(
        planned.path.clone(),
        &root,
        planned.references.clone(),
        Some(planned.deriver.clone()),
    )?)
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), BenchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_error(path))?;
    f.write_all(bytes).map_err(io_error(path))
}

/// Removes a tree that Nix may have made read-only: directories are made writable first.
fn remove_tree(root: &Path) -> Result<(), BenchError> {
    use std::os::unix::fs::PermissionsExt;
    fn writable(dir: &Path) -> Result<(), BenchError> {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(io_error(dir))?;
        for entry in fs::read_dir(dir).map_err(io_error(dir))? {
            let entry = entry.map_err(io_error(dir))?;
            if entry.file_type().map_err(io_error(dir))?.is_dir() {
                writable(&entry.path())?;
            }
        }
        Ok(())
    }
    let meta = fs::symlink_metadata(root).map_err(io_error(root))?;
    if meta.is_dir() {
        writable(root)?;
        fs::remove_dir_all(root).map_err(io_error(root))
    } else {
        fs::remove_file(root).map_err(io_error(root))
    }
}

/// Starts `nix-store --register-validity --hash-given` on `infos` (in the order given;
/// Nix registers them in store-path order, which the plan made the same).
fn start_registration(infos: &[PathInfo]) -> Result<Child, BenchError> {
    let mut input = String::with_capacity(infos.len() * 400);
    for info in infos {
        input.push_str(&info.path.to_absolute(NIX_STORE_DIR));
        input.push('\n');
        input.push_str(&info.nar_hash.to_base16());
        input.push('\n');
        input.push_str(&info.nar_size.to_string());
        input.push('\n');
        if let Some(d) = &info.deriver {
            input.push_str(&d.to_absolute(NIX_STORE_DIR));
        }
        input.push('\n');
        input.push_str(&info.references.len().to_string());
        input.push('\n');
        for r in &info.references {
            input.push_str(&r.to_absolute(NIX_STORE_DIR));
            input.push('\n');
        }
    }
    let mut child = Command::new("nix-store")
        .args(["--register-validity", "--hash-given"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| command_error(format!("cannot run it: {e}")))?;
    // nix-store reads all of its input before it registers (or writes) anything.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    if let Err(e) = stdin.write_all(input.as_bytes()) {
        drop(stdin);
        let detail = finish_registration(child)
            .err()
            .map_or_else(String::new, |e| format!(": {e}"));
        return Err(command_error(format!("writing its input: {e}{detail}")));
    }
    Ok(child)
}

fn finish_registration(mut child: Child) -> Result<(), BenchError> {
    drop(child.stdin.take());
    let mut stderr = String::new();
    if let Some(mut s) = child.stderr.take() {
        // Errors only: it is short, and read to the end before waiting.
        let _ = s.read_to_string(&mut stderr);
    }
    let status = child
        .wait()
        .map_err(|e| command_error(format!("waiting for it: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(command_error(format!("{status}: {}", stderr.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec(tag: &str, paths: usize, refs: usize, disorder_permille: u32) -> StoreSpec {
        StoreSpec {
            tag: tag.into(),
            paths,
            refs,
            disorder_permille,
            tiny: false,
        }
    }

    #[test]
    fn places_sort_like_numbers() {
        let digits: Vec<[u8; 2]> = (0..1024).map(place_digits).collect();
        assert!(digits.windows(2).all(|w| w[0] < w[1]), "{digits:?}");
    }

    /// Nix registers one call's paths in store-path order: it must be the plan's order.
    /// Every reference is valid before its referrer's call, or in the same call; exactly
    /// the planned paths come before one of their references.
    #[test]
    fn the_plan_registers_in_its_order_and_references_are_satisfiable() {
        for (n, k, d) in [
            (1, 3, 0),
            (2, 1, 500),
            (2500, 3, 0),
            (2500, 3, 7),
            (3001, 5, 500),
        ] {
            let plan = plan_store(&spec("t", n, k, d));
            assert_eq!(plan.paths.len(), n);
            assert_eq!(plan.disordered.len(), n * d as usize / 1000, "{n} {k} {d}");
            let mut position = HashMap::new();
            let mut batch_of = HashMap::new();
            for (b, range) in plan.batches.iter().enumerate() {
                assert!(range.len() <= 1024, "{range:?}");
                let names: Vec<&str> = plan.order[range.clone()]
                    .iter()
                    .map(|&i| plan.paths[i].path.base_name())
                    .collect();
                assert!(
                    names.windows(2).all(|w| w[0] < w[1]),
                    "batch {b}: {names:?}"
                );
                for p in range.clone() {
                    position.insert(&plan.paths[plan.order[p]].path, p);
                    batch_of.insert(&plan.paths[plan.order[p]].path, b);
                }
            }
            assert_eq!(plan.batches.last().map(|r| r.end), Some(n));
            let mut early = 0;
            for (i, p) in plan.paths.iter().enumerate() {
                assert_eq!(p.path.name(), format!("bf-t-{i}"));
                let others: Vec<_> = p.references.iter().filter(|r| **r != p.path).collect();
                assert!(others.len() <= k, "{i}: {:?}", p.references);
                let mut before_a_reference = false;
                for r in others {
                    let j: usize = r.name().rsplit('-').next().unwrap().parse().unwrap();
                    assert!(j < i, "{i} refers to {j}");
                    assert!(batch_of[r] <= batch_of[&p.path], "{i} → {j}");
                    before_a_reference |= position[r] > position[&p.path];
                }
                early += usize::from(before_a_reference);
            }
            assert_eq!(early, plan.disordered.len(), "{n} {k} {d}");
        }
    }

    #[test]
    fn the_same_spec_makes_the_same_names_and_another_tag_others() {
        let a = plan_store(&spec("a", 50, 3, 20));
        let again = plan_store(&spec("a", 50, 3, 20));
        let b = plan_store(&spec("b", 50, 3, 20));
        let names = |p: &StorePlan| -> Vec<String> {
            p.paths
                .iter()
                .map(|x| x.path.base_name().to_owned())
                .collect()
        };
        assert_eq!(names(&a), names(&again));
        let refs = |p: &StorePlan| -> Vec<Vec<StorePath>> {
            p.paths.iter().map(|x| x.references.clone()).collect()
        };
        assert_eq!(refs(&a), refs(&again));
        let theirs: std::collections::HashSet<&str> =
            b.paths.iter().map(|x| x.path.hash_part()).collect();
        assert!(a.paths.iter().all(|x| !theirs.contains(x.path.hash_part())));
    }

    #[test]
    fn a_tiny_store_has_names_and_a_manifest_of_its_own() {
        let tree = spec("a", 50, 3, 20);
        let tiny = StoreSpec {
            tiny: true,
            ..tree.clone()
        };
        assert_ne!(tree.manifest_name(), tiny.manifest_name());
        let (a, b) = (plan_store(&tree), plan_store(&tiny));
        assert!(b.tiny && !a.tiny);
        let theirs: std::collections::HashSet<&str> =
            a.paths.iter().map(|x| x.path.hash_part()).collect();
        assert!(b.paths.iter().all(|x| !theirs.contains(x.path.hash_part())));
    }

    #[test]
    fn bad_parameters_are_named() {
        for (s, want) in [
            (spec("", 10, 3, 0), "--tag"),
            (spec("a/b", 10, 3, 0), "--tag"),
            (spec("-x", 10, 3, 0), "--tag"),
            (spec("x", 0, 3, 0), "--paths 0"),
            (spec("x", 10, 65, 0), "--refs 65"),
            (spec("x", 10, 3, 501), "--disorder 501"),
            (spec("x", 10, 0, 5), "--refs 0"),
        ] {
            let e = s.check().unwrap_err();
            assert!(e.contains(want), "{s:?}: {e}");
        }
        spec("ok.tag_1-x", 10, 3, 500).check().unwrap();
    }
}
