//! `narflow push`: upload store paths and their closure to a cache.
use super::{CliError, exit};
use anyhow::Context;
use narflow::cache::{self, url::CacheUrl};
use narflow::format::signing::SigningKey;
use narflow::format::store_path::DEFAULT_STORE_DIR;
use narflow::pipeline::compress::{Compression, CompressionSettings};
use narflow::pipeline::{self, Outcome, PushOptions};
use narflow::store::LocalStore;
use std::io::Read;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Where and how to upload: shared by `push` and `daemon`.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// Destination cache, in Nix's store-URL syntax (file:///DIR, s3://BUCKET?...).
    #[arg(long, env = "NARFLOW_TO")]
    pub to: String,
    /// Secret key file (Nix format) to sign narinfos with; repeatable.
    #[arg(long = "key-file", env = "NARFLOW_KEY_FILE", value_delimiter = ',')]
    pub key_files: Vec<PathBuf>,
    /// NAR compression [default: zstd, or the URL's compression=].
    #[arg(long, env = "NARFLOW_COMPRESSION", value_parser = Compression::parse)]
    pub compression: Option<Compression>,
    /// Compression level [default: zstd 3, xz 6, or the URL's compression-level=].
    #[arg(long, env = "NARFLOW_LEVEL")]
    pub level: Option<i32>,
    /// Compression threads [default: one per core].
    #[arg(long, env = "NARFLOW_JOBS")]
    pub jobs: Option<usize>,
    /// Memory budget for NAR data in flight, e.g. 64M, 1G [default: 64M].
    #[arg(long, env = "NARFLOW_MEMORY", value_parser = super::parse_size)]
    pub memory: Option<u64>,
    /// Chunk size: each chunk is compressed as an independent frame [default: 4M].
    #[arg(long, env = "NARFLOW_CHUNK_SIZE", value_parser = super::parse_size, hide = true)]
    pub chunk_size: Option<u64>,
    /// Allow uploading without a signing key.
    #[arg(long)]
    pub unsigned: bool,
    /// Use a secret key file that group or others can access (refused by default, as ssh
    /// refuses such a private key).
    #[arg(long, env = "NARFLOW_ALLOW_INSECURE_KEY_FILE")]
    pub allow_insecure_key_file: bool,
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub upload: UploadArgs,
    /// Upload only the given paths, not their closure (references must be in the cache).
    #[arg(long)]
    pub no_closure: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Afterwards, remove what interrupted uploads left in the cache (temporary files,
    /// staging objects, unfinished multipart uploads) that is older than a day.
    #[arg(long)]
    pub sweep_orphans: bool,
    /// Store paths, paths inside them, or symlinks to them; `-` reads paths from stdin.
    #[arg(required = true)]
    pub paths: Vec<String>,
}

/// Loads a Nix secret key file. Like ssh with a private key, it refuses a file that group
/// or others can access (any of the mode bits 0o077), unless `allow_insecure`: such a key
/// may already be known to others, and every narinfo signed with it would be suspect.
/// The key text is wiped from memory once parsed.
fn load_key(path: &Path, allow_insecure: bool) -> Result<SigningKey, CliError> {
    use std::os::unix::fs::PermissionsExt;
    let cannot_read = || format!("cannot read key file {}", path.display());
    let mut file = std::fs::File::open(path)
        .with_context(cannot_read)
        .map_err(CliError::usage)?;
    // The mode of what was opened (a symlink's target), not of a path looked up again.
    let meta = file
        .metadata()
        .with_context(cannot_read)
        .map_err(CliError::usage)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 && !allow_insecure {
        return Err(CliError::usage(anyhow::anyhow!(
            "key file {path} has mode {mode:04o}: group or others can access this secret key; \
             make it private with `chmod 600 {path}` (or pass --allow-insecure-key-file to use \
             it anyway)",
            path = path.display()
        )));
    }
    // Sized up front so the text is not copied by a growing buffer (copies would not be
    // wiped); key files are about 100 bytes.
    let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut text = Zeroizing::new(String::with_capacity(capacity.min(1 << 16)));
    file.read_to_string(&mut text)
        .with_context(cannot_read)
        .map_err(CliError::usage)?;
    SigningKey::parse(&text)
        .with_context(|| format!("key file {}", path.display()))
        .map_err(CliError::usage)
}

impl UploadArgs {
    /// The cache URL and pipeline options these arguments describe (URL parameters fill in
    /// what the flags leave out).
    ///
    /// # Errors
    /// A usage error naming the bad argument, URL parameter or key file.
    pub fn resolve(&self) -> Result<(CacheUrl, PushOptions), CliError> {
        let args = self;
        let url = CacheUrl::parse(&args.to).map_err(CliError::usage)?;
        let kind = match (args.compression, url.param("compression")) {
            (Some(c), _) => c,
            (None, Some(c)) => Compression::parse(c)
                .map_err(|e| CliError::usage(anyhow::anyhow!("{}: {e}", url.original)))?,
            (None, None) => Compression::Zstd,
        };
        let level = match (args.level, url.param("compression-level")) {
            (Some(l), _) => Some(l),
            (None, Some(l)) => Some(l.parse().map_err(|_| {
                CliError::usage(anyhow::anyhow!(
                    "{}: bad compression-level {l:?}",
                    url.original
                ))
            })?),
            (None, None) => None,
        };
        let compression = CompressionSettings::new(kind, level)
            .map_err(|e| CliError::usage(anyhow::anyhow!(e)))?;

        let mut key_files = args.key_files.clone();
        if let Some(k) = url.param("secret-key") {
            key_files.push(PathBuf::from(k));
        }
        let keys = key_files
            .iter()
            .map(|f| load_key(f, args.allow_insecure_key_file))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() && !args.unsigned {
            return Err(CliError::usage(anyhow::anyhow!(
                "no signing key: pass --key-file FILE (or the URL's secret-key=FILE), or --unsigned to upload unsigned narinfos"
            )));
        }
        let mut opts = PushOptions::new(compression, keys);
        opts.nar_listing = url.write_nar_listing();
        super::apply_pipeline_args(&mut opts, args.jobs, args.memory, args.chunk_size)
            .map_err(|e| CliError::usage(anyhow::anyhow!(e)))?;
        Ok((url, opts))
    }
}

pub fn run(args: PushArgs) -> Result<u8, CliError> {
    let (url, mut opts) = args.upload.resolve()?;
    let mut inputs = Vec::new();
    for p in &args.paths {
        if p == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading paths from stdin")
                .map_err(CliError::usage)?;
            inputs.extend(s.split_whitespace().map(str::to_owned));
        } else {
            inputs.push(p.clone());
        }
    }

    opts.closure = !args.no_closure;
    let store = LocalStore::open(DEFAULT_STORE_DIR, Path::new("/nix/var/nix/db/db.sqlite"));
    let tuning = cache::S3Tuning::from_url(&url).map_err(CliError::usage)?;
    let cache = cache::open(&url, &opts.cache_options(tuning)).map_err(CliError::usage)?;
    let mut bad_inputs = Vec::new();
    let mut paths = Vec::new();
    for arg in &inputs {
        match pipeline::resolve_argument(arg, store.store_dir()) {
            Ok(p) => paths.push(p),
            Err(why) => {
                eprintln!("narflow: {why}");
                bad_inputs.push(why);
            }
        }
    }
    let progress = super::progress::CliProgress::new();
    let report =
        pipeline::push(&store, cache.as_ref(), &paths, &opts, &progress).map_err(|e| match e {
            pipeline::PushError::Cache(
                cache::CacheError::Config(_) | cache::CacheError::Unreachable(_),
            ) => CliError::usage(e),
            e => CliError::failed(e),
        })?;
    progress.done();

    let uploaded = report.count(|o| matches!(o, Outcome::Uploaded { .. }));
    let present = report.count(|o| matches!(o, Outcome::AlreadyPresent));
    let failed = report.failed().count() + bad_inputs.len();
    let secs = report.elapsed.as_secs_f64();
    let mbps = report.nar_bytes as f64 / 1e6 / secs.max(1e-9);
    if args.json {
        let failures: Vec<serde_json::Value> = report
            .failed()
            .map(|r| match &r.outcome {
                Outcome::Failed(why) => serde_json::json!({
                    "path": r.path, "error": why.to_string(), "transient": why.is_transient()
                }),
                _ => unreachable!(),
            })
            .chain(
                bad_inputs
                    .iter()
                    .map(|why| serde_json::json!({"path": null, "error": why})),
            )
            .collect();
        let summary = serde_json::json!({
            "uploaded": uploaded,
            "already_present": present,
            "failed": failed,
            "nar_bytes": report.nar_bytes,
            "file_bytes": report.file_bytes,
            "seconds": secs,
            "nar_mb_per_s": mbps,
            "failures": failures,
        });
        println!("{summary}");
    }
    eprintln!(
        "narflow: {uploaded} uploaded ({:.1} MiB NAR → {:.1} MiB), {present} already in cache, {failed} failed, {secs:.2} s ({mbps:.0} MB/s)",
        report.nar_bytes as f64 / 1048576.0,
        report.file_bytes as f64 / 1048576.0,
    );
    let mut sweep_failed = false;
    if args.sweep_orphans {
        let grace = narflow::daemon::ORPHAN_GRACE;
        match cache.sweep_orphans(grace) {
            Ok(n) => eprintln!(
                "narflow: removed {n} leftovers of interrupted uploads older than {} h",
                grace.as_secs() / 3600
            ),
            Err(e) => {
                eprintln!("narflow: orphan sweep: {e}");
                sweep_failed = true;
            }
        }
    }
    Ok(if failed > 0 || sweep_failed {
        exit::SOME_FAILED
    } else {
        exit::OK
    })
}
