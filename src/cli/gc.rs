//! `narflow gc`: delete from a cache what no root keeps, in an order that keeps every
//! visible state closed; print what it would delete (and, unless `--dry-run`, deletes it).
use super::{CliError, exit};
use narflow::cache;
use narflow::format::nix32;
use narflow::format::store_path::DEFAULT_STORE_DIR;
use narflow::maintain::gc::{self, GcConfig, GcObserver, GcOutcome};
use narflow::maintain::gc_plan::{Count, GcPlan, RootReason, Totals};
use narflow::maintain::roots::{parse_keep_file, parse_root};
use narflow::settings::{Merged, Settings, Span, format_size};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("roots")
        .required(true)
        .multiple(true)
        .args(["keep_closure_of", "keep_file", "keep_newer_than"])
))]
pub struct GcArgs {
    /// Keep this store path (or basename, or hash part) and its closure, as the cache's
    /// narinfos give it; repeatable. A path the cache lacks is an error.
    #[arg(long, value_name = "PATH")]
    pub keep_closure_of: Vec<String>,
    /// Keep the closures of the paths listed in FILE, one a line (`#` comments); repeatable.
    #[arg(long, value_name = "FILE")]
    pub keep_file: Vec<PathBuf>,
    /// Keep every narinfo modified within DURATION (e.g. 30d), with its closure.
    #[arg(long, value_name = "DURATION")]
    pub keep_newer_than: Option<Span>,
    /// Print what would be deleted; write nothing to the cache.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the summary as JSON on stdout, with every root and why it is kept.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub settings: Settings,
}

pub fn run(args: &GcArgs, merged: &Merged) -> Result<u8, CliError> {
    let resolved = merged.resolve().map_err(CliError::usage)?;
    super::refuse_other_commands_flags(&resolved, "gc", &[])?;
    let url = resolved.cache_url().map_err(CliError::usage)?;
    let mut roots = Vec::new();
    for p in &args.keep_closure_of {
        // A symlink to a store path (`./result`, `/run/current-system`) names its target;
        // the store itself is not read.
        let h = parse_root(p, DEFAULT_STORE_DIR)
            .or_else(|e| {
                let target = std::fs::canonicalize(p).map_err(|_| e.clone())?;
                parse_root(&target.to_string_lossy(), DEFAULT_STORE_DIR).map_err(|_| e)
            })
            .map_err(|e| CliError::usage(anyhow::anyhow!("--keep-closure-of {p:?}: {e}")))?;
        roots.push((h, RootReason::Closure));
    }
    for f in &args.keep_file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| CliError::usage(anyhow::anyhow!("--keep-file {}: {e}", f.display())))?;
        let listed = parse_keep_file(&text, DEFAULT_STORE_DIR).map_err(|bad| {
            let lines: Vec<String> = bad.iter().map(ToString::to_string).collect();
            CliError::usage(anyhow::anyhow!(
                "--keep-file {}: {}",
                f.display(),
                lines.join("; ")
            ))
        })?;
        roots.extend(listed.into_iter().map(|h| (h, RootReason::File)));
    }
    let cfg = GcConfig {
        store_dir: DEFAULT_STORE_DIR.to_owned(),
        roots,
        keep_newer_than: args.keep_newer_than.map(|s| s.0),
        grace: resolved.gc_grace,
        settle: resolved.gc_settle,
        batch_size: resolved.gc_batch_size,
        dry_run: args.dry_run,
    };
    let cache = cache::open(
        url,
        &resolved
            .push_options_with_keys(Vec::new())
            .cache_options(resolved.s3.clone()),
    )
    .map_err(CliError::usage)?;

    let mut printer = Printer {
        url: url.original.clone(),
        json: args.json,
        dry_run: args.dry_run,
    };
    let outcome = gc::run(cache.as_ref(), &cfg, &mut printer).map_err(|e| {
        if e.is_refusal() {
            CliError::usage(e)
        } else {
            CliError::failed(e)
        }
    })?;
    if args.json {
        println!("{}", json(&url.original, args.dry_run, &outcome));
    } else {
        report(&url.original, args.dry_run, &outcome);
    }
    Ok(if outcome.has_problems() {
        exit::SOME_FAILED
    } else {
        exit::OK
    })
}

/// Prints the plan as soon as it is made (before anything is deleted).
struct Printer {
    url: String,
    json: bool,
    dry_run: bool,
}

impl GcObserver for Printer {
    fn planned(&mut self, plan: &GcPlan) {
        if self.json {
            return;
        }
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleting"
        };
        println!(
            "{}: {} roots; keeping {}; {verb} {}",
            self.url,
            plan.roots.len(),
            totals(&plan.kept),
            totals(&plan.deleted)
        );
    }
}

fn count(c: Count) -> String {
    format!("{} ({})", c.objects, format_size(c.bytes))
}

fn totals(t: &Totals) -> String {
    format!(
        "{} narinfos, {} .ls, {} NARs, {} logs",
        count(t.narinfos),
        count(t.listings),
        count(t.nars),
        count(t.logs)
    )
}

fn report(url: &str, dry_run: bool, o: &GcOutcome) {
    for key in &o.unparsable {
        println!("{key}: unparsable-narinfo: its references and NAR are unknown");
    }
    for h in &o.plan.circular {
        println!(
            "{}.narinfo: circular: unreachable, but in a circle of references: left",
            nix32::encode(h)
        );
    }
    for (key, e) in &o.failed {
        println!("{key}: not deleted: {e}");
    }
    if let Some(why) = &o.stopped {
        println!("{url}: the sweep stopped: {why}");
    }
    if !dry_run {
        let d = &o.deleted;
        println!(
            "{url}: deleted {} narinfos, {} .ls, {} NARs, {} logs",
            d.narinfos, d.listings, d.nars, d.logs
        );
    }
}

fn why(r: RootReason) -> &'static str {
    match r {
        RootReason::Closure => "keep-closure-of",
        RootReason::File => "keep-file",
        RootReason::NewerThan => "keep-newer-than",
        RootReason::Grace => "grace",
    }
}

fn json(url: &str, dry_run: bool, o: &GcOutcome) -> serde_json::Value {
    use serde_json::json;
    let count = |c: Count| json!({"objects": c.objects, "bytes": c.bytes});
    let totals = |t: &Totals| {
        json!({
            "narinfos": count(t.narinfos),
            "listings": count(t.listings),
            "nars": count(t.nars),
            "logs": count(t.logs),
        })
    };
    let roots: Vec<serde_json::Value> = o
        .plan
        .roots
        .iter()
        .map(|r| {
            json!({
                "narinfo": format!("{}.narinfo", nix32::encode(&r.hash)),
                "why": why(r.why),
                "present": r.present,
            })
        })
        .collect();
    let deleted = (!dry_run).then(|| {
        let d = &o.deleted;
        json!({"narinfos": d.narinfos, "listings": d.listings, "nars": d.nars, "logs": d.logs})
    });
    json!({
        "cache": url,
        "dry_run": dry_run,
        "generation": o.generation.map(|g| format!("{g:016x}")),
        "now": o.now,
        "narinfos": o.narinfos,
        "roots": roots,
        "keep": totals(&o.plan.kept),
        "delete": totals(&o.plan.deleted),
        "deleted": deleted,
        "circular": o.plan.circular.iter().map(|h| format!("{}.narinfo", nix32::encode(h))).collect::<Vec<_>>(),
        "unparsable": o.unparsable,
        "failed": o.failed.iter().map(|(k, e)| json!({"object": k, "error": e.to_string()})).collect::<Vec<_>>(),
        "stopped": o.stopped,
    })
}
