//! `narflow push`: upload store paths and their closure to a cache.
use super::{CliError, exit};
use narflow::cache;
use narflow::format::store_path::DEFAULT_STORE_DIR;
use narflow::pipeline::{self, outcome::Outcome};
use narflow::settings::{Merged, Settings, format_size};
use narflow::store::LocalStore;
use std::path::Path;

#[derive(Debug, clap::Args)]
pub struct PushArgs {
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
    #[command(flatten)]
    pub settings: Settings,
}

pub fn run(args: &PushArgs, merged: &Merged) -> Result<u8, CliError> {
    let resolved = merged.resolve().map_err(CliError::usage)?;
    super::refuse_other_commands_flags(&resolved, "push", &[])?;
    let url = resolved.cache_url().map_err(CliError::usage)?;
    let mut opts = resolved.push_options().map_err(CliError::usage)?;
    let inputs = super::path_arguments(&args.paths, std::io::stdin())?;

    opts.closure = !args.no_closure;
    let store = LocalStore::open(DEFAULT_STORE_DIR, Path::new("/nix/var/nix/db/db.sqlite"));
    let journal = super::open_journal(
        url,
        resolved.push_journal(),
        resolved.upload_journal.is_some(),
    )?;
    let mut open_opts = opts.cache_options(resolved.s3.clone());
    open_opts.journal = journal.clone();
    let cache = cache::open(url, &open_opts).map_err(CliError::usage)?;
    let max_age = resolved.resume_max_age;
    super::end_records(journal.as_ref(), cache.as_ref(), &store, max_age, "push");
    let mut bad_inputs = Vec::new();
    let mut paths = Vec::new();
    for arg in &inputs {
        match narflow::store::lookup::resolve_argument(arg, store.store_dir()) {
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
            pipeline::outcome::PushError::Cache(
                cache::CacheError::Config(_) | cache::CacheError::Unreachable(_),
            ) => CliError::usage(e),
            e => CliError::failed(e),
        })?;
    progress.done();
    super::end_records(journal.as_ref(), cache.as_ref(), &store, max_age, "push");
    let logs = opts.upload_logs.then(|| {
        let uploaded = narflow::logs::uploaded_paths(&report.results, store.store_dir());
        narflow::logs::upload_build_logs(cache.as_ref(), &store, &uploaded)
    });

    let uploaded = report.count(|o| matches!(o, Outcome::Uploaded { .. }));
    let present = report.count(|o| matches!(o, Outcome::AlreadyPresent));
    let failed = report.failed().count() + bad_inputs.len();
    let secs = report.elapsed.as_secs_f64();
    let mbps = report.bytes.nar as f64 / 1e6 / secs.max(1e-9);
    // Parts of recorded uploads the server already had: not sent again by this run.
    let resumed = cache.resumed_bytes();
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
            "nar_bytes": report.bytes.nar,
            "file_bytes": report.bytes.file,
            "resumed_bytes": resumed,
            "seconds": secs,
            "nar_mb_per_s": mbps,
            "failures": failures,
            "logs": logs,
        });
        println!("{summary}");
    }
    let resumed_note = if resumed > 0 {
        format!(", {} resumed", format_size(resumed))
    } else {
        String::new()
    };
    eprintln!(
        "narflow: {uploaded} uploaded ({} NAR → {}{resumed_note}), {present} already in cache, {failed} failed, {secs:.2} s ({mbps:.0} MB/s)",
        format_size(report.bytes.nar),
        format_size(report.bytes.file),
    );
    if let Some(l) = logs {
        eprintln!(
            "narflow: build logs: {} uploaded, {} not kept by Nix, {} failed",
            l.uploaded, l.missing, l.failed
        );
    }
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
