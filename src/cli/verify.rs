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
    /// Store paths to verify, with every path their narinfos reach through References.
    #[arg(required_unless_present = "all")]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub settings: Settings,
}

pub fn run(args: &VerifyArgs, merged: &Merged) -> Result<u8, CliError> {
    let resolved = merged.resolve().map_err(CliError::usage)?;
    super::refuse_other_commands_flags(&resolved, "verify")?;
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
    .map_err(|e| match e {
        cache::CacheError::Config(_) | cache::CacheError::Unreachable(_) => CliError::usage(e),
        e => CliError::failed(e),
    })?;
    bar.done();
    let seconds = started.elapsed().as_secs_f64();
    let nar_mb_per_s = summary.nar_bytes_decoded as f64 / 1e6 / seconds.max(1e-9);

    let counts: Vec<String> = Kind::ALL
        .iter()
        .filter(|k| summary.count(**k) > 0)
        .map(|k| format!("{} {k}", summary.count(*k)))
        .collect();
    if json {
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
        let out = serde_json::json!({
            "cache": url.original,
            "narinfos": summary.narinfos,
            "nars": summary.nars,
            "nar_bytes": summary.nar_bytes,
            "nars_read": summary.nars_read,
            "file_bytes_read": summary.file_bytes_read,
            "nar_bytes_decoded": summary.nar_bytes_decoded,
            "seconds": seconds,
            "nar_mb_per_s": nar_mb_per_s,
            "problem_count": summary.total_problems(),
            "problems": by_kind,
        });
        println!("{out}");
    } else if counts.is_empty() {
        println!(
            "{}: {} narinfos and {} NARs ({} bytes) verified: no problems",
            url.original, summary.narinfos, summary.nars, summary.nar_bytes
        );
    } else {
        println!(
            "{}: {} narinfos and {} NARs ({} bytes) verified: {} problems ({})",
            url.original,
            summary.narinfos,
            summary.nars,
            summary.nar_bytes,
            summary.total_problems(),
            counts.join(", ")
        );
    }
    if args.contents && !json {
        println!(
            "{}: {} NARs read ({} bytes, {} decompressed) in {seconds:.1} s ({nar_mb_per_s:.0} MB/s of NAR)",
            url.original, summary.nars_read, summary.file_bytes_read, summary.nar_bytes_decoded
        );
    }
    Ok(if summary.total_problems() == 0 {
        exit::OK
    } else {
        exit::SOME_FAILED
    })
}
