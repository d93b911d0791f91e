//! `narflow verify`: check a cache from one listing and report each problem.
use super::{CliError, exit};
use narflow::cache;
use narflow::format::signing::VerifyingKey;
use narflow::format::store_path::{DEFAULT_STORE_DIR, StorePath};
use narflow::maintain::verify::{self, Kind, Problem, VerifyOptions};
use narflow::settings::{Merged, Settings, load_key};

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Verify every narinfo of the cache, and look for NARs no narinfo names.
    #[arg(long, conflicts_with = "paths")]
    pub all: bool,
    /// Print the problems, by kind, and the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also read every NAR: FileHash over its bytes, NarHash and NarSize over it
    /// decompressed, and its path's `.ls` listing, if any, against it.
    #[arg(long)]
    pub contents: bool,
    /// Mend what the local store can (upload its paths again through push's pipeline,
    /// signed with --key-file), sweep leftovers older than --grace ([gc] grace), then verify again.
    #[arg(long)]
    pub repair: bool,
    /// With --repair: delete what the store cannot mend, with every narinfo that refers
    /// to it (referrers first).
    #[arg(long, requires = "repair")]
    pub delete_unrepairable: bool,
    /// Store paths to verify, with every path their narinfos reach through References.
    #[arg(required_unless_present = "all")]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub settings: Settings,
}

pub fn run(args: &VerifyArgs, merged: &Merged) -> Result<u8, CliError> {
    let resolved = merged.resolve().map_err(CliError::usage)?;
    // `--grace` (gc's, the one age below which an object may still belong to an upload)
    // is repair's too.
    let allowed: &[&str] = if args.repair { &["gc.grace"] } else { &[] };
    super::refuse_other_commands_flags(&resolved, "verify", allowed)?;
    let url = resolved.cache_url().map_err(CliError::usage)?;
    let mut trusted = resolved
        .trusted_keys
        .iter()
        .map(|k| {
            VerifyingKey::parse(k)
                .map_err(|e| CliError::usage(anyhow::anyhow!("--trusted-key {k:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if trusted.is_empty() {
        for f in &resolved.key_files {
            let key = load_key(f, resolved.allow_insecure_key_file).map_err(CliError::usage)?;
            trusted.push(key.verifying_key());
        }
    }
    if trusted.is_empty() {
        return Err(CliError::usage(anyhow::anyhow!(
            "no trusted key: give --trusted-key NAME:KEY, or --key-file for its public half"
        )));
    }
    let paths = if args.all {
        None
    } else {
        let inputs = super::path_arguments(&args.paths, std::io::stdin())?;
        let paths = inputs
            .iter()
            .map(|p| {
                StorePath::from_absolute_path_prefix(p, DEFAULT_STORE_DIR)
                    .map_err(|e| CliError::usage(anyhow::anyhow!("{p}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Some(paths)
    };
    // NARs read at once: one per thread (`--jobs`), twice that from a remote cache
    // (while one waits on the network another decompresses), as many as the memory
    // budget holds.
    let readers = match url.location {
        cache::url::CacheLocation::File(_) => resolved.jobs,
        cache::url::CacheLocation::S3 { .. } => resolved.jobs * 2,
    };
    let by_memory = resolved.memory / narflow::maintain::contents::MEMORY_PER_NAR;
    let readers = readers
        .min(usize::try_from(by_memory).unwrap_or(usize::MAX))
        .max(1);
    let opts = VerifyOptions {
        store_dir: DEFAULT_STORE_DIR.to_owned(),
        trusted,
        paths,
        contents: args.contents.then_some(readers),
    };
    let cache = cache::open(
        url,
        &resolved
            .push_options_with_keys(Vec::new())
            .cache_options(resolved.s3.clone()),
    )
    .map_err(CliError::usage)?;

    if args.repair {
        return repair(args, &resolved, url, cache.as_ref(), opts);
    }

    let mut found: Vec<Problem> = Vec::new();
    let json = args.json;
    let bar = super::progress::VerifyBar::new();
    let started = std::time::Instant::now();
    let summary = verify::verify_with(cache.as_ref(), &opts, &bar, &mut |p| {
        if json {
            found.push(p);
        } else {
            bar.println(&p.to_string());
        }
    })
    .map_err(run_error)?;
    bar.done();
    let seconds = started.elapsed().as_secs_f64();
    if json {
        let mut out = summary_json(&summary, &found, seconds);
        out["cache"] = url.original.clone().into();
        println!("{out}");
    } else {
        println!("{}", summary_line(&url.original, &summary));
        if args.contents {
            println!("{}", contents_line(&url.original, &summary, seconds));
        }
    }
    Ok(exit_code(&summary))
}

fn run_error(e: cache::CacheError) -> CliError {
    match e {
        cache::CacheError::Config(_) | cache::CacheError::Unreachable(_) => CliError::usage(e),
        e => CliError::failed(e),
    }
}

fn exit_code(summary: &verify::Summary) -> u8 {
    if summary.total_problems() == 0 {
        exit::OK
    } else {
        exit::SOME_FAILED
    }
}

/// The summary and the problems by kind, as `--json` prints them.
fn summary_json(summary: &verify::Summary, found: &[Problem], seconds: f64) -> serde_json::Value {
    let mut by_kind = serde_json::Map::new();
    for k in Kind::ALL {
        let of_kind: Vec<serde_json::Value> = found
            .iter()
            .filter(|p| p.kind == k)
            .map(|p| serde_json::json!({"object": p.object, "detail": p.detail}))
            .collect();
        if !of_kind.is_empty() {
            by_kind.insert(k.as_str().to_owned(), of_kind.into());
        }
    }
    serde_json::json!({
        "narinfos": summary.narinfos,
        "nars": summary.nars,
        "nar_bytes": summary.nar_bytes,
        "nars_read": summary.nars_read,
        "file_bytes_read": summary.file_bytes_read,
        "nar_bytes_decoded": summary.nar_bytes_decoded,
        "seconds": seconds,
        "nar_mb_per_s": summary.nar_bytes_decoded as f64 / 1e6 / seconds.max(1e-9),
        "problem_count": summary.total_problems(),
        "problems": by_kind,
    })
}

fn summary_line(cache: &str, summary: &verify::Summary) -> String {
    let counts: Vec<String> = Kind::ALL
        .iter()
        .filter(|k| summary.count(**k) > 0)
        .map(|k| format!("{} {k}", summary.count(*k)))
        .collect();
    let what = format!(
        "{cache}: {} narinfos and {} NARs ({} bytes) verified",
        summary.narinfos, summary.nars, summary.nar_bytes
    );
    if counts.is_empty() {
        format!("{what}: no problems")
    } else {
        format!(
            "{what}: {} problems ({})",
            summary.total_problems(),
            counts.join(", ")
        )
    }
}

fn contents_line(cache: &str, summary: &verify::Summary, seconds: f64) -> String {
    format!(
        "{cache}: {} NARs read ({} bytes, {} decompressed) in {seconds:.1} s ({:.0} MB/s of NAR)",
        summary.nars_read,
        summary.file_bytes_read,
        summary.nar_bytes_decoded,
        summary.nar_bytes_decoded as f64 / 1e6 / seconds.max(1e-9)
    )
}

/// `narflow verify --repair`.
fn repair(
    args: &VerifyArgs,
    resolved: &narflow::settings::Resolved,
    url: &cache::url::CacheUrl,
    cache: &dyn cache::BinaryCache,
    opts: VerifyOptions,
) -> Result<u8, CliError> {
    use narflow::maintain::repair::{self, RepairOptions};
    let mut push = resolved.push_options().map_err(|e| {
        CliError::usage(anyhow::anyhow!(
            "--repair signs what it uploads as push does: {e}"
        ))
    })?;
    let store = narflow::store::LocalStore::open(
        DEFAULT_STORE_DIR,
        std::path::Path::new("/nix/var/nix/db/db.sqlite"),
    );
    let json = args.json;
    let bar = super::progress::VerifyBar::new();
    let uploads = super::progress::CliProgress::new();
    let mut found = Vec::new();
    let started = std::time::Instant::now();
    let ropts = RepairOptions {
        verify: opts,
        delete_unrepairable: args.delete_unrepairable,
        grace: resolved.gc_grace,
    };
    let r = repair::repair(cache, &store, &mut push, &ropts, &bar, &uploads, &mut |p| {
        if json {
            found.push(p);
        } else {
            bar.println(&p.to_string());
        }
    })
    .map_err(|e| match e {
        repair::RepairError::Cache(e) => run_error(e),
        repair::RepairError::Gc(e) if e.is_refusal() => CliError::usage(e),
        e => CliError::failed(e),
    })?;
    bar.done();
    uploads.done();
    let seconds = started.elapsed().as_secs_f64();
    let failed: Vec<serde_json::Value> = r
        .failed
        .iter()
        .map(|(path, why)| serde_json::json!({"path": path, "error": why}))
        .collect();
    let unrepairable: Vec<serde_json::Value> = r
        .plan
        .unrepairable
        .iter()
        .map(|u| serde_json::json!({"object": u.object, "what": u.what}))
        .collect();
    if json {
        let out = serde_json::json!({
            "cache": url.original,
            "before": summary_json(&r.before, &found, seconds),
            "repair": {
                "uploaded": r.uploaded,
                "failed": failed,
                "deleted": r.deleted,
                "swept": r.swept,
                "unrepairable": unrepairable,
            },
            "after": summary_json(&r.after, &r.left, seconds),
        });
        println!("{out}");
    } else {
        println!("{}", summary_line(&url.original, &r.before));
        for (path, why) in &r.failed {
            eprintln!("narflow: {path}: {why}");
        }
        for u in &r.plan.unrepairable {
            println!(
                "{}: cannot be repaired from the local store: {}",
                u.object, u.what
            );
        }
        println!(
            "{}: repair: {} paths uploaded again, {} failed, {} objects deleted, {} leftovers swept",
            url.original,
            r.uploaded.len(),
            r.failed.len(),
            r.deleted.len(),
            r.swept
        );
        for p in &r.left {
            println!("{p}");
        }
        println!("after repair: {}", summary_line(&url.original, &r.after));
    }
    Ok(exit_code(&r.after))
}
