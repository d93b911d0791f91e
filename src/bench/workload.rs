//! Workloads: generating a workload's store paths on disk with their manifest, and reusing a cached one.

use super::*;

/// The workload shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Thousands of store paths of a few KiB: per-path overhead and concurrency.
    ManySmall,
    /// One store path of ≥ 1 GiB: chunking, parallel compression, bounded memory.
    Large,
    /// Paths from 1 KiB to tens of MiB: both at once.
    Mixed,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 3] = [
        WorkloadKind::ManySmall,
        WorkloadKind::Large,
        WorkloadKind::Mixed,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::ManySmall => "many-small",
            WorkloadKind::Large => "large",
            WorkloadKind::Mixed => "mixed",
        }
    }

    /// Parses a workload name.
    ///
    /// # Errors
    /// A message naming the value and the accepted ones.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown workload {s:?} (many-small, large or mixed)"))
    }
}

/// Everything that determines a workload's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    pub kind: WorkloadKind,
    pub seed: u64,
    /// Number of store paths.
    pub paths: usize,
    /// Smallest and largest file-content size of one path, in bytes. Sizes are uniform
    /// in between for `many-small`, mostly small but spread up to the largest for `mixed`
    /// (see `Rng::closure_size`); `large` uses the largest.
    pub min_path_bytes: u64,
    pub max_path_bytes: u64,
}

impl WorkloadSpec {
    /// The default shape of `kind`: many-small 2,000 paths of 1–7 KiB; large one path of
    /// `large_size` bytes; mixed 200 paths of 1 KiB–20 MiB.
    pub fn default_for(kind: WorkloadKind, seed: u64, large_size: u64) -> Self {
        let (paths, min, max) = match kind {
            WorkloadKind::ManySmall => (2000, 1 << 10, 7 << 10),
            WorkloadKind::Large => (1, large_size, large_size),
            WorkloadKind::Mixed => (200, 1 << 10, 20 << 20),
        };
        WorkloadSpec {
            kind,
            seed,
            paths,
            min_path_bytes: min,
            max_path_bytes: max,
        }
    }

    /// The directory name of this workload: its kind and a hash of everything that
    /// determines its bytes (generator version included).
    pub fn id(&self) -> String {
        let key = format!(
            "narflow-bench/{GENERATOR_VERSION}/{}/{}/{}/{}/{}",
            self.kind.name(),
            self.seed,
            self.paths,
            self.min_path_bytes,
            self.max_path_bytes
        );
        format!(
            "{}-{}",
            self.kind.name(),
            &Sha256::digest(key.as_bytes()).to_base16()[..16]
        )
    }

    /// A one-line description, e.g. `2000 paths of 1.0–7.0 KiB`.
    pub fn describe(&self) -> String {
        if self.paths == 1 && self.min_path_bytes == self.max_path_bytes {
            format!("1 path of {}", format_size(self.max_path_bytes))
        } else {
            format!(
                "{} paths of {}–{}",
                self.paths,
                format_size(self.min_path_bytes),
                format_size(self.max_path_bytes)
            )
        }
    }
}

/// A generated workload: a fake store dir and the PathInfos of its paths, references
/// first.
#[derive(Debug)]
pub struct Workload {
    pub spec: WorkloadSpec,
    /// `<bench dir>/<spec id>`.
    pub dir: PathBuf,
    /// `<dir>/store`, the store dir the paths live in.
    pub store_dir: String,
    pub infos: Vec<PathInfo>,
}

impl Workload {
    /// Total NAR size of all paths.
    pub fn nar_bytes(&self) -> u64 {
        self.infos.iter().map(|i| i.nar_size).sum()
    }
}

/// The result of [`prepare`].
#[derive(Debug)]
pub struct Prepared {
    pub workload: Workload,
    /// True when the workload was generated now; false when a cached one was verified.
    pub generated: bool,
    /// Time spent generating, or verifying (the warm-up read).
    pub seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Manifest {
    pub(super) format: u32,
    pub(super) generator: u32,
    pub(super) spec: WorkloadSpec,
    pub(super) paths: Vec<ManifestPath>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ManifestPath {
    /// Base name `<hash>-<name>`.
    pub(super) path: String,
    /// `sha256:<nix32>`.
    pub(super) nar_hash: String,
    pub(super) nar_size: u64,
    /// Base names, sorted.
    pub(super) references: Vec<String>,
    #[serde(default)]
    pub(super) deriver: Option<String>,
}

/// Makes `spec` ready under `dir`: loads the cached workload and verifies it with one
/// full read (which also warms the page cache for the runs), or generates it when it is
/// missing, stale or damaged. Generated data is synced to disk before this returns, so no
/// run pays for writing it back.
///
/// # Errors
/// [`BenchError::Io`] naming the file that could not be written or read.
pub fn prepare(dir: &Path, spec: &WorkloadSpec) -> Result<Prepared, BenchError> {
    let started = Instant::now();
    let final_dir = dir.join(spec.id());
    let why = match load(&final_dir, spec)? {
        Ok(workload) => match verify(&workload) {
            Ok(()) => {
                return Ok(Prepared {
                    workload,
                    generated: false,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            Err(why) => why,
        },
        Err(why) => why,
    };
    if final_dir.exists() {
        tracing::warn!("{why}; generating the workload again");
        fs::remove_dir_all(&final_dir).map_err(io_error(&final_dir))?;
    }
    mkdir(dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.partial-", spec.id()))
        .tempdir_in(dir)
        .map_err(io_error(dir))?;
    let infos = generate(&tmp.path().join("store"), spec)?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        generator: GENERATOR_VERSION,
        spec: spec.clone(),
        paths: infos
            .iter()
            .map(|i| ManifestPath {
                path: i.path.base_name().to_owned(),
                nar_hash: i.nar_hash.to_string(),
                nar_size: i.nar_size,
                references: i
                    .references
                    .iter()
                    .map(|r| r.base_name().to_owned())
                    .collect(),
                deriver: i.deriver.as_ref().map(|d| d.base_name().to_owned()),
            })
            .collect(),
    };
    let mpath = tmp.path().join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| BenchError::File {
        path: mpath.clone(),
        reason: e.to_string(),
    })?;
    fs::write(&mpath, json).map_err(io_error(&mpath))?;
    sync_fs(tmp.path())?;
    let renamed = fs::rename(tmp.path(), &final_dir);
    drop(tmp);
    // A failed rename is fine when another bench generated the same workload meanwhile.
    let workload = match (load(&final_dir, spec)?, renamed) {
        (Ok(w), _) => w,
        (Err(_), Err(e)) => {
            return Err(BenchError::Io {
                path: final_dir,
                source: e,
            });
        }
        (Err(why), Ok(())) => {
            return Err(BenchError::File {
                path: final_dir,
                reason: format!("the workload just generated cannot be read back: {why}"),
            });
        }
    };
    Ok(Prepared {
        workload,
        generated: true,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Makes everything written on the file system holding `path` durable.
pub(super) fn sync_fs(path: &Path) -> Result<(), BenchError> {
    let f = File::open(path).map_err(io_error(path))?;
    rustix::fs::syncfs(&f).map_err(|e| BenchError::Io {
        path: path.to_owned(),
        source: e.into(),
    })
}

/// Loads the workload in `dir` when its manifest exists and matches `spec`; `Ok(Err(why))`
/// when it is missing, stale or damaged and must be generated.
pub(super) fn load(
    dir: &Path,
    spec: &WorkloadSpec,
) -> Result<Result<Workload, String>, BenchError> {
    let mpath = dir.join(MANIFEST_FILE);
    let text = match fs::read(&mpath) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Err(format!("{} is missing", mpath.display())));
        }
        Err(e) => {
            return Err(BenchError::Io {
                path: mpath,
                source: e,
            });
        }
    };
    let manifest: Manifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => {
            return Ok(Err(format!(
                "{}: unreadable manifest: {e}",
                mpath.display()
            )));
        }
    };
    if manifest.format != MANIFEST_FORMAT
        || manifest.generator != GENERATOR_VERSION
        || manifest.spec != *spec
    {
        return Ok(Err(format!(
            "{}: made by another generator or for other parameters",
            mpath.display()
        )));
    }
    let store = dir.join("store");
    let store_dir = store
        .to_str()
        .ok_or_else(|| BenchError::File {
            path: store.clone(),
            reason: "the bench directory must be a UTF-8 path".into(),
        })?
        .to_owned();
    let mut infos = Vec::with_capacity(manifest.paths.len());
    for (i, p) in manifest.paths.into_iter().enumerate() {
        let bad = |field: &str, e: String| format!("{}: paths[{i}].{field}: {e}", mpath.display());
        let parsed = (|| -> Result<PathInfo, String> {
            let path =
                StorePath::from_base_name(&p.path).map_err(|e| bad("path", e.to_string()))?;
            let nar_hash =
                Sha256::parse(&p.nar_hash).map_err(|e| bad("nar_hash", e.to_string()))?;
            let references = p
                .references
                .iter()
                .map(|r| StorePath::from_base_name(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("references", e.to_string()))?;
            let deriver = p
                .deriver
                .as_deref()
                .map(StorePath::from_base_name)
                .transpose()
                .map_err(|e| bad("deriver", e.to_string()))?;
            Ok(PathInfo {
                path,
                nar_hash,
                nar_size: p.nar_size,
                references,
                deriver,
                sigs: vec![],
                ca: None,
            })
        })();
        let info = match parsed {
            Ok(info) => info,
            Err(why) => return Ok(Err(why)),
        };
        if fs::symlink_metadata(store.join(info.path.base_name())).is_err() {
            return Ok(Err(format!(
                "{} is missing",
                info.path.to_absolute(&store_dir)
            )));
        }
        infos.push(info);
    }
    if infos.len() != spec.paths {
        return Ok(Err(format!(
            "{}: {} paths listed, {} expected",
            mpath.display(),
            infos.len(),
            spec.paths
        )));
    }
    Ok(Ok(Workload {
        spec: spec.clone(),
        dir: dir.to_owned(),
        store_dir,
        infos,
    }))
}

/// Opens the workload `spec` already prepared under `dir`, without reading its contents
/// (a measuring child process uses this: its parent has just verified it).
///
/// # Errors
/// [`BenchError::File`] when it is missing or does not match `spec`.
pub fn open(dir: &Path, spec: &WorkloadSpec) -> Result<Workload, BenchError> {
    let wdir = dir.join(spec.id());
    load(&wdir, spec)?.map_err(|reason| BenchError::File {
        path: wdir,
        reason: format!("not a prepared workload: {reason}"),
    })
}

/// Reads every path of `w` once (the warm-up) and checks it against the manifest.
pub(super) fn verify(w: &Workload) -> Result<(), String> {
    for info in &w.infos {
        let full = PathBuf::from(info.path.to_absolute(&w.store_dir));
        let (hash, size) = hash_path(&full).map_err(|e| e.to_string())?;
        if (hash, size) != (info.nar_hash, info.nar_size) {
            return Err(format!(
                "{} hashes to {hash} ({size} bytes) but the manifest records {} ({} bytes)",
                full.display(),
                info.nar_hash,
                info.nar_size
            ));
        }
    }
    Ok(())
}

/// A store path base name for `name`, its hash part derived from `key`.
pub(super) fn store_path(key: &str, name: &str) -> StorePath {
    let digest = Sha256::digest(key.as_bytes());
    let hash = crate::format::nix32::encode(&digest.0[..20]);
    StorePath::from_base_name(&format!("{hash}-{name}")).expect("generated names are valid")
}

/// Generates the paths of `spec` under `store` (references first) and returns their
/// PathInfos, NarHash computed from disk.
pub(super) fn generate(store: &Path, spec: &WorkloadSpec) -> Result<Vec<PathInfo>, BenchError> {
    mkdir(store)?;
    let mut rng = Rng::new(spec.seed ^ 0x006e_6172_666c_6f77 ^ ((spec.kind as u64) << 56));
    let vocab = Vocab::new(&mut rng);
    let mut infos: Vec<PathInfo> = Vec::with_capacity(spec.paths);
    for i in 0..spec.paths {
        let mut prng = rng.fork();
        let name = format!(
            "{}{}-{}.{}",
            vocab.word_str(&mut prng),
            if prng.percent(30) {
                format!("-{}", vocab.word_str(&mut prng))
            } else {
                String::new()
            },
            prng.below(10),
            prng.below(30)
        );
        let key = format!(
            "narflow-bench:{GENERATOR_VERSION}:{}:{}:{i}",
            spec.kind.name(),
            spec.seed
        );
        let path = store_path(&format!("{key}:{name}"), &name);
        let deriver = store_path(&format!("{key}:drv"), &format!("{name}.drv"));
        // A few references to earlier paths, often to the first few (the "glibc" effect).
        let mut references: Vec<StorePath> = Vec::new();
        if i > 0 {
            for _ in 0..prng.below(5) {
                let r = if prng.percent(50) {
                    prng.below((i as u64).min(8))
                } else {
                    prng.below(i as u64)
                };
                references.push(infos[r as usize].path.clone());
            }
        }
        if spec.kind == WorkloadKind::Large || prng.percent(25) {
            references.push(path.clone());
        }
        references.sort();
        references.dedup();
        let mentioned: Vec<String> = references
            .iter()
            .map(|r| r.to_absolute("/nix/store"))
            .collect();
        let size = match spec.kind {
            WorkloadKind::ManySmall => prng.range(spec.min_path_bytes, spec.max_path_bytes),
            WorkloadKind::Large => spec.max_path_bytes,
            WorkloadKind::Mixed => prng.closure_size(spec.min_path_bytes, spec.max_path_bytes),
        };
        let ctx = TreeCtx {
            vocab: &vocab,
            pkg: path.name(),
            refs: &mentioned,
        };
        let full = store.join(path.base_name());
        if spec.kind == WorkloadKind::ManySmall || size < SMALL_TREE_MAX {
            small_tree(&full, size, &mut prng, &ctx)?;
        } else {
            package_tree(&full, size, &mut prng, &ctx)?;
        }
        infos.push(PathInfo::of_tree(path, &full, references, Some(deriver))?);
    }
    Ok(infos)
}
