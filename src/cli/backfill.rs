//! `narflow backfill`: upload a whole store, the paths registered since a date, or the
//! closures of named paths, in resumable windows (the work is `narflow::backfill`'s).
use super::{CliError, exit};
use anyhow::Context;
use narflow::backfill::{self, BackfillError, BackfillOptions, Selection};
use narflow::cache::{self, CacheError, url::CacheUrl};
use narflow::format::store_path::DEFAULT_STORE_DIR;
use narflow::settings::{Merged, Settings, SettingsError, format_size};
use narflow::store::{LocalStore, StoreError};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["all", "since", "paths"])))]
pub struct BackfillArgs {
    /// Every valid path of the store, in registration order.
    #[arg(long)]
    pub all: bool,
    /// Only paths registered at or after DATE: an RFC 3339 date (2026-01-31, midnight
    /// UTC) or date-time with its offset (2026-01-31T08:00:00Z, ...T10:00:00+02:00).
    #[arg(long, value_name = "DATE", value_parser = parse_since, conflicts_with = "all")]
    pub since: Option<i64>,
    /// Upload .drv files too (otherwise only those an uploaded path refers to).
    #[arg(long)]
    pub derivations: bool,
    /// Skip paths whose store signatures include one by this key name (they came from
    /// that cache, e.g. cache.nixos.org-1); repeatable.
    #[arg(long = "skip-signed-by", value_name = "KEYNAME")]
    pub skip_signed_by: Vec<String>,
    /// Skip paths whose narinfo this cache serves (opened read-only); repeatable. Clients
    /// then need both caches.
    #[arg(long = "skip-upstream", value_name = "URL")]
    pub skip_upstream: Vec<String>,
    /// Print how many paths and NAR bytes would go up, and upload nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// The resume state [default: <state-dir>/backfill-<hash of the URL>.json].
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Paths per window.
    #[arg(long, hide = true, default_value_t = backfill::DEFAULT_WINDOW)]
    pub window: usize,
    /// Store paths (or paths inside them, or symlinks to them) whose closures to upload;
    /// `-` reads them from stdin.
    #[arg(conflicts_with_all = ["all", "since"])]
    pub paths: Vec<String>,
    #[command(flatten)]
    pub settings: Settings,
}

/// `--since`: seconds since the epoch.
fn parse_since(s: &str) -> Result<i64, String> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t.unix_timestamp());
    }
    let day = time::format_description::parse_borrowed::<2>("[year]-[month]-[day]")
        .expect("valid format");
    match time::Date::parse(s, &day) {
        Ok(d) => Ok(d.midnight().assume_utc().unix_timestamp()),
        Err(e) => Err(format!(
            "not an RFC 3339 date (2026-01-31) or date-time (2026-01-31T08:00:00Z): {e}"
        )),
    }
}

pub fn run(args: &BackfillArgs, merged: &Merged) -> Result<u8, CliError> {
    let resolved = merged.resolve().map_err(CliError::usage)?;
    super::refuse_other_commands_flags(&resolved, "backfill", &[])?;
    if args.window == 0 {
        return Err(CliError::usage(anyhow::anyhow!(
            "--window must be at least 1"
        )));
    }
    let url = resolved.cache_url().map_err(CliError::usage)?;
    // A dry run signs nothing, so it needs no key.
    let push = match resolved.push_options() {
        Err(SettingsError::NoKey) if args.dry_run => resolved.push_options_with_keys(Vec::new()),
        r => r.map_err(CliError::usage)?,
    };
    let store = LocalStore::open(DEFAULT_STORE_DIR, Path::new("/nix/var/nix/db/db.sqlite"));
    let selection = if args.paths.is_empty() {
        Selection::Store { since: args.since }
    } else {
        Selection::Paths(named_paths(&args.paths, store.store_dir())?)
    };
    let state_file = args.state.clone().unwrap_or_else(|| {
        backfill::state::default_path(&resolved.state_dir, url.original.as_str())
    });
    let journal = if args.dry_run {
        None
    } else {
        super::open_journal(
            url,
            resolved.backfill_journal(&state_file),
            resolved.upload_journal.is_some(),
        )?
    };
    let mut open_opts = push.cache_options(resolved.s3.clone());
    open_opts.journal = journal.clone();
    let cache = cache::open(url, &open_opts).map_err(CliError::usage)?;
    let max_age = resolved.resume_max_age;
    super::end_records(
        journal.as_ref(),
        cache.as_ref(),
        &store,
        max_age,
        "backfill",
    );
    let mut upstreams = Vec::new();
    for u in &args.skip_upstream {
        let parsed = CacheUrl::parse(u)
            .with_context(|| format!("--skip-upstream {u}"))
            .map_err(CliError::usage)?;
        let tuning = cache::S3Tuning::from_url(&parsed)
            .with_context(|| format!("--skip-upstream {u}"))
            .map_err(CliError::usage)?;
        let opened = cache::open(&parsed, &push.cache_options(tuning))
            .with_context(|| format!("--skip-upstream {u}"))
            .map_err(CliError::usage)?;
        upstreams.push(opened);
    }
    let upstream_refs: Vec<&dyn cache::BinaryCache> =
        upstreams.iter().map(|c| c.as_ref()).collect();
    let opts = BackfillOptions {
        selection,
        derivations: args.derivations,
        skip_signed_by: args.skip_signed_by.clone(),
        skip_upstream: args.skip_upstream.clone(),
        dry_run: args.dry_run,
        window: args.window,
        state_file: Some(state_file),
    };
    let progress = super::progress::BackfillBar::new();
    let result = backfill::backfill(
        &store,
        cache.as_ref(),
        &upstream_refs,
        &push,
        &opts,
        &progress,
    );
    progress.done();
    super::end_records(
        journal.as_ref(),
        cache.as_ref(),
        &store,
        max_age,
        "backfill",
    );
    let summary = result.map_err(|e| match e {
        BackfillError::Cache(CacheError::Config(_) | CacheError::Unreachable(_))
        | BackfillError::Upstream { .. }
        | BackfillError::State(_)
        | BackfillError::Store(StoreError::Command(_)) => CliError::usage(e),
        BackfillError::Push(narflow::pipeline::outcome::PushError::Cache(
            CacheError::Config(_) | CacheError::Unreachable(_),
        )) => CliError::usage(e),
        e => CliError::failed(e),
    })?;
    report(args, &summary);
    Ok(if summary.failed > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    })
}

/// The named paths, `-` read from stdin; one that is not a store path is a usage error
/// naming it.
fn named_paths(
    args: &[String],
    store_dir: &str,
) -> Result<Vec<narflow::format::store_path::StorePath>, CliError> {
    super::path_arguments(args, std::io::stdin())?
        .iter()
        .map(|a| {
            narflow::store::lookup::resolve_argument(a, store_dir)
                .map_err(|why| CliError::usage(anyhow::anyhow!(why)))
        })
        .collect()
}

fn report(args: &BackfillArgs, s: &backfill::Summary) {
    let secs = s.elapsed.as_secs_f64();
    if s.dry_run {
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "paths": s.uploaded,
                    "nar_bytes": s.bytes.nar,
                    "already_present": s.present,
                    "skipped": {"signed_by": s.skipped_signed_by, "upstream": s.skipped_upstream},
                })
            );
        } else {
            println!(
                "{} paths would go up ({} of NAR); {} already in the cache, {} skipped",
                s.uploaded,
                format_size(s.bytes.nar),
                s.present,
                s.skipped_signed_by + s.skipped_upstream
            );
        }
        return;
    }
    let mbps = s.bytes.nar as f64 / 1e6 / secs.max(1e-9);
    if args.json {
        let failures: Vec<serde_json::Value> = s
            .failures
            .iter()
            .map(|r| match &r.outcome {
                narflow::pipeline::outcome::Outcome::Failed(why) => serde_json::json!({
                    "path": r.path, "error": why.to_string(), "transient": why.is_transient()
                }),
                _ => serde_json::json!({"path": r.path}),
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "uploaded": s.uploaded,
                "already_present": s.present,
                "skipped": {"signed_by": s.skipped_signed_by, "upstream": s.skipped_upstream},
                "failed": s.failed,
                "nar_bytes": s.bytes.nar,
                "file_bytes": s.bytes.file,
                "seconds": secs,
                "nar_mb_per_s": mbps,
                "pulled_in": s.pulled_in,
                "listed": s.listed,
                "resumed_from": s.resumed_from,
                "cursor": s.cursor,
                "logs": s.logs,
                "failures": failures,
            })
        );
    }
    eprintln!(
        "narflow: backfill: {} uploaded ({} NAR → {}), {} already in cache, {} skipped ({} signed by an upstream key, {} served upstream), {} failed, {secs:.2} s ({mbps:.0} MB/s)",
        s.uploaded,
        format_size(s.bytes.nar),
        format_size(s.bytes.file),
        s.present,
        s.skipped_signed_by + s.skipped_upstream,
        s.skipped_signed_by,
        s.skipped_upstream,
        s.failed,
    );
    if let Some(l) = s.logs {
        eprintln!(
            "narflow: backfill: build logs: {} uploaded, {} not kept by Nix, {} failed",
            l.uploaded, l.missing, l.failed
        );
    }
    if s.failed > 0 {
        eprintln!(
            "narflow: backfill: the cursor stays before the first failed path; run again to retry"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_since;

    #[test]
    fn since_takes_rfc3339_dates_and_date_times_in_utc() {
        assert_eq!(parse_since("1970-01-02"), Ok(86_400));
        assert_eq!(parse_since("1970-01-02T00:00:10Z"), Ok(86_410));
        assert_eq!(parse_since("1970-01-02T02:00:10+02:00"), Ok(86_410));
        for bad in ["2026-13-01", "yesterday", "2026-01-31 08:00", "1700000000"] {
            let e = parse_since(bad).unwrap_err();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
    }
}
