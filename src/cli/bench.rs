//! `narflow bench`: prepare the synthetic workloads, push each through the real pipeline
//! into the null sink and a `file://` cache, measure the zstd-only ceiling, print the
//! table (or `--json`), and compare with `--baseline`. `narflow bench make-store` makes
//! a generated store in the real `/nix/store` for the backfill benchmarks.
//!
//! Exit codes: 0 measured, no regression; 1 a figure is more than `--threshold` worse
//! than the baseline's, or a run had failed paths; 2 usage error, unusable `--dir`, or a
//! baseline that cannot be read or compared. make-store: 0 made or found valid; 1 it
//! could not be made; 2 usage error.
use super::{CliError, exit};
use anyhow::anyhow;
use narflow::bench::{
    self, BenchReport, RssMethod, RunResult, Settings, Sink, SinkKind, WorkloadKind, WorkloadSpec,
};
use narflow::cache::url::{CacheLocation, CacheUrl};
use narflow::format::compression::CompressionSettings;
use narflow::pipeline::PushOptions;
use narflow::settings::{self, Merged, PipelineSettings, clap_source};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: Option<BenchCommand>,
    /// Workload: many-small, large or mixed; repeatable [default: all three].
    #[arg(long = "workload", value_name = "NAME", value_parser = WorkloadKind::parse)]
    pub workloads: Vec<WorkloadKind>,
    /// Sink: null (pipeline alone) or file (a file:// cache); repeatable [default: both].
    #[arg(long = "sink", value_name = "SINK", value_parser = SinkKind::parse)]
    pub sinks: Vec<SinkKind>,
    /// The file:// cache to bench against; each run pushes into a fresh directory inside
    /// it, removed afterwards [default: a temporary directory under --dir].
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// Print one JSON report on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// A saved --json report: compare with it, exit 1 when a figure is more than
    /// --threshold percent worse.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// How much worse (percent) a figure may be than the baseline's.
    #[arg(long, value_name = "PCT", default_value_t = 10.0)]
    pub threshold: f64,
    /// Where workloads are generated and kept between runs
    /// [default: $XDG_CACHE_HOME/narflow-bench, else /var/tmp/narflow-bench].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Size of the large workload's one path, e.g. 256M, 4G [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = settings::parse_size)]
    pub size: Option<u64>,
    /// Seed of the generated workloads (compare only reports made with the same one).
    #[arg(long, value_name = "N", default_value_t = bench::DEFAULT_SEED)]
    pub seed: u64,
    /// Compression, threads (for the pipeline and the ceiling) and the memory budget, as
    /// push takes them.
    #[command(flatten)]
    pub pipeline: PipelineSettings,
    /// Runs per workload and sink; the median run is reported
    /// [default: 3; 1 for a large workload of 1 GiB or more].
    #[arg(long, value_name = "N")]
    pub repeat: Option<usize>,
    /// How peak RSS is measured: auto, clear-refs (in process) or child-process (one
    /// process per run).
    #[arg(long, value_name = "METHOD", default_value = "auto")]
    pub rss: String,
    /// Internal: make one run of one workload into one sink in this process and print its
    /// figures as JSON (used by --rss child-process).
    #[arg(long, hide = true)]
    pub internal_run: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Make N small store paths that reference each other in the real /nix/store (once
    /// per machine: a valid store from an earlier run is reused); print its manifest's
    /// path (one store path per line, in registration order).
    MakeStore(MakeStoreArgs),
    /// The ceiling of `narflow verify --contents`: up to --limit bytes of a cache's NARs
    /// read into memory, then checked (FileHash, decompression, NarHash) on --jobs
    /// threads, best of three passes; prints NAR MB/s (JSON with --json).
    VerifyCeiling(VerifyCeilingArgs),
    /// Internal (scripts/bench-latency): a loopback proxy in front of UPSTREAM
    /// (host:port) that holds each response back by DELAY_MS and counts requests by
    /// method; prints `listening PORT`, and the counts as JSON on SIGTERM. It listens on
    /// PORT when given (a later run reached at the same endpoint), else on a free port.
    #[command(hide = true)]
    DelayProxy {
        upstream: String,
        delay_ms: u64,
        port: Option<u16>,
    },
}

#[derive(Debug, clap::Args)]
pub struct VerifyCeilingArgs {
    /// The cache whose NARs are the sample.
    #[arg(long, value_name = "URL")]
    pub cache: String,
    /// Threads [default: one per core].
    #[arg(long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Compressed bytes of NARs in the sample.
    #[arg(long, value_name = "SIZE", value_parser = settings::parse_size, default_value = "1G")]
    pub limit: u64,
    #[arg(long)]
    pub json: bool,
}

/// `narflow bench verify-ceiling`.
fn verify_ceiling(args: &VerifyCeilingArgs) -> Result<u8, CliError> {
    let url = CacheUrl::parse(&args.cache).map_err(|e| usage(e.to_string()))?;
    let s3 = narflow::cache::S3Tuning::from_url(&url).map_err(CliError::usage)?;
    let options = narflow::cache::OpenOptions {
        upload_memory: 0,
        max_rate: None,
        s3,
        journal: None,
        signers: Vec::new(),
    };
    let cache = narflow::cache::open(&url, &options).map_err(CliError::usage)?;
    let sample = narflow::maintain::contents::load_sample(cache.as_ref(), "/nix/store", args.limit)
        .map_err(CliError::failed)?;
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let c = narflow::maintain::contents::measure_ceiling(&sample, jobs, CEILING_PASSES)
        .map_err(CliError::failed)?;
    if args.json {
        let out = serde_json::json!({
            "threads": c.threads,
            "nars": c.nars,
            "file_bytes": c.file_bytes,
            "nar_bytes": c.nar_bytes,
            "seconds": c.seconds,
            "nar_mb_per_s": c.nar_mb_per_s,
        });
        println!("{out}");
    } else {
        println!(
            "verify ceiling: {} NARs ({} bytes, {} of NAR) checked in {:.2} s on {} threads: {:.0} MB/s of NAR",
            c.nars, c.file_bytes, c.nar_bytes, c.seconds, c.threads, c.nar_mb_per_s
        );
    }
    Ok(exit::OK)
}

#[derive(Debug, clap::Args)]
pub struct MakeStoreArgs {
    /// How many store paths.
    #[arg(long, value_name = "N")]
    pub paths: usize,
    /// Names the store: paths are bf-TAG-<index>, the manifest TAG-N.paths; the same tag
    /// and parameters make the same store on every machine.
    #[arg(long, value_name = "TAG")]
    pub tag: String,
    /// Each path refers to up to K earlier ones.
    #[arg(long, value_name = "K", default_value_t = bench::DEFAULT_REFS)]
    pub refs: usize,
    /// Per thousand paths, how many are registered before one of their references.
    #[arg(long, value_name = "PERMILLE", default_value_t = 0)]
    pub disorder: u32,
    /// Each path one small file instead of a tree (for stores of a million paths).
    #[arg(long)]
    pub tiny: bool,
    /// Where the manifest is kept.
    #[arg(long, value_name = "DIR", default_value = bench::DEFAULT_MANIFEST_DIR)]
    pub manifest_dir: PathBuf,
}

/// `narflow bench make-store`.
fn make_store(args: &MakeStoreArgs) -> Result<u8, CliError> {
    let spec = bench::StoreSpec {
        tag: args.tag.clone(),
        paths: args.paths,
        refs: args.refs,
        disorder_permille: args.disorder,
        tiny: args.tiny,
    };
    spec.check().map_err(usage)?;
    let made = bench::make_store(&spec, &args.manifest_dir).map_err(CliError::failed)?;
    if made.reused {
        eprintln!(
            "narflow bench make-store: {} paths valid from an earlier run ({:.1} s to check)",
            made.already_valid, made.seconds
        );
    } else {
        eprintln!(
            "narflow bench make-store: {} paths made and registered, {} valid already, {} \
             registered before a reference, in {:.1} s",
            made.registered, made.already_valid, made.disordered, made.seconds
        );
    }
    println!("{}", made.manifest.display());
    Ok(exit::OK)
}

/// Passes over the ceiling's sample; the best counts, the one least disturbed by other
/// work on the machine. Each takes well under a second with the default sample limit.
const CEILING_PASSES: usize = 3;

/// Everything a run needs, resolved from the arguments once.
#[derive(Debug)]
struct Plan {
    kinds: Vec<WorkloadKind>,
    sinks: Vec<SinkKind>,
    dir: PathBuf,
    file_parent: PathBuf,
    large_size: u64,
    seed: u64,
    compression: CompressionSettings,
    opts: PushOptions,
}

/// `$XDG_CACHE_HOME/narflow-bench`, else `/var/tmp/narflow-bench` (not /tmp: it is often
/// a small tmpfs, and the workloads are worth keeping between runs).
fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("narflow-bench"),
        _ => PathBuf::from("/var/tmp/narflow-bench"),
    }
}

fn usage(msg: String) -> CliError {
    CliError::usage(anyhow!(msg))
}

/// Resolves and checks the arguments.
fn plan(args: &BenchArgs, matches: &clap::ArgMatches) -> Result<Plan, CliError> {
    if !(args.threshold.is_finite() && args.threshold >= 0.0) {
        return Err(usage(format!(
            "--threshold {}: expected a percentage, 0 or more",
            args.threshold
        )));
    }
    let to = args
        .to
        .as_deref()
        .map(CacheUrl::parse)
        .transpose()
        .map_err(CliError::usage)?;
    let to_dir = match &to {
        None => None,
        Some(u) => match &u.location {
            CacheLocation::File(d) => Some(d.clone()),
            CacheLocation::S3 { .. } => {
                return Err(usage(format!(
                    "--to {}: narflow bench measures file:// caches only",
                    u.original
                )));
            }
        },
    };
    // Compression and pipeline settings as push resolves them (the --to URL's
    // compression= and compression-level= fill in what the flags leave out), from the
    // flags and their variables alone: a benchmark measures what it is told, not this
    // machine's config file.
    let flags = settings::Settings {
        to: args.to.clone(),
        pipeline: args.pipeline.clone(),
        ..settings::Settings::default()
    };
    let cmd = <PipelineSettings as clap::Args>::augment_args(clap::Command::new("bench"));
    let resolved = Merged::new(
        flags,
        |id| match id {
            "to" => args
                .to
                .is_some()
                .then(|| settings::Source::Flag("--to".into())),
            id => clap_source(matches, id, &cmd),
        },
        None,
        None,
    )
    .resolve()
    .map_err(CliError::usage)?;
    let compression = resolved.compression;

    let dir = args.dir.clone().unwrap_or_else(default_dir);
    let dir =
        std::path::absolute(&dir).map_err(|e| usage(format!("--dir {}: {e}", dir.display())))?;
    if dir.to_str().is_none() {
        return Err(usage(format!(
            "--dir {}: must be a UTF-8 path (it becomes a store dir)",
            dir.display()
        )));
    }
    let large_size = args.size.unwrap_or(bench::DEFAULT_LARGE_SIZE);
    if large_size < 1 << 20 {
        return Err(usage(format!(
            "--size {large_size}: the large workload needs at least 1M"
        )));
    }
    let mut kinds = if args.workloads.is_empty() {
        WorkloadKind::ALL.to_vec()
    } else {
        args.workloads.clone()
    };
    dedup_in_order(&mut kinds);
    let mut sinks = if args.sinks.is_empty() {
        SinkKind::ALL.to_vec()
    } else {
        args.sinks.clone()
    };
    dedup_in_order(&mut sinks);
    if to.is_some() && !sinks.contains(&SinkKind::File) {
        return Err(usage("--to needs the file sink (--sink file)".into()));
    }
    if args.repeat == Some(0) {
        return Err(usage("--repeat 0: at least one run is needed".into()));
    }

    let opts = resolved.push_options_with_keys(vec![bench::bench_key()]);
    let file_parent = to_dir.unwrap_or_else(|| dir.join("caches"));
    Ok(Plan {
        kinds,
        sinks,
        dir,
        file_parent,
        large_size,
        seed: args.seed,
        compression,
        opts,
    })
}

fn dedup_in_order<T: PartialEq + Copy>(v: &mut Vec<T>) {
    let mut seen = Vec::new();
    v.retain(|x| {
        let new = !seen.contains(x);
        seen.push(*x);
        new
    });
}

fn sink_of(kind: SinkKind, plan: &Plan) -> Sink {
    match kind {
        SinkKind::Null => Sink::Null,
        SinkKind::File => Sink::File {
            parent: plan.file_parent.clone(),
        },
    }
}

/// Default runs: three, but one for a large workload of 1 GiB or more (each run takes
/// seconds, long enough to be stable on its own, and keeps a default bench short).
fn default_repeat(spec: &WorkloadSpec) -> usize {
    if spec.kind == WorkloadKind::Large && spec.max_path_bytes >= 1 << 30 {
        1
    } else {
        3
    }
}

pub fn run(args: BenchArgs, matches: &clap::ArgMatches) -> Result<u8, CliError> {
    match &args.command {
        Some(BenchCommand::MakeStore(a)) => return make_store(a),
        Some(BenchCommand::VerifyCeiling(a)) => return verify_ceiling(a),
        Some(BenchCommand::DelayProxy {
            upstream,
            delay_ms,
            port,
        }) => {
            let delay = std::time::Duration::from_millis(*delay_ms);
            bench::delay_proxy(upstream, delay, port.unwrap_or(0)).map_err(CliError::failed)?;
            return Ok(exit::OK);
        }
        None => {}
    }
    // Before any work of ours, so the load average is the machine's, not ours.
    let machine = bench::Machine::detect();
    let plan = plan(&args, matches)?;
    let rss = match args.rss.as_str() {
        "auto" => RssMethod::detect(),
        "clear-refs" => match RssMethod::detect() {
            RssMethod::ClearRefs => RssMethod::ClearRefs,
            _ => {
                return Err(usage(
                    "--rss clear-refs: resetting the peak RSS through /proc/self/clear_refs \
                     does not work here; use --rss child-process"
                        .into(),
                ));
            }
        },
        "child-process" => RssMethod::ChildProcess,
        other => {
            return Err(usage(format!(
                "--rss {other:?}: expected auto, clear-refs or child-process"
            )));
        }
    };
    if args.internal_run {
        return internal_run(&plan);
    }
    let baseline = match &args.baseline {
        Some(p) => Some((p, bench::read_baseline(p).map_err(CliError::usage)?)),
        None => None,
    };

    // 1. Workloads: generated once, then verified by a full read (the warm-up).
    let mut workloads = Vec::new();
    for &kind in &plan.kinds {
        let spec = WorkloadSpec::default_for(kind, plan.seed, plan.large_size);
        eprintln!(
            "narflow bench: {}: {} in {}",
            kind.name(),
            spec.describe(),
            plan.dir.join(spec.id()).display()
        );
        let p = bench::prepare(&plan.dir, &spec).map_err(CliError::usage)?;
        eprintln!(
            "narflow bench: {}: {} of NAR {} in {:.1} s",
            kind.name(),
            narflow::settings::format_size(p.workload.nar_bytes()),
            if p.generated {
                "generated (kept for later runs)"
            } else {
                "read and verified (warm-up)"
            },
            p.seconds
        );
        workloads.push(p.workload);
    }

    // 2. Runs. Ceilings come after every run: loading their samples would leave the
    // allocator holding memory that the in-process RSS figures would then include.
    let mut measured: Vec<(usize, SinkKind, Vec<RunResult>)> = Vec::new();
    for (wi, w) in workloads.iter().enumerate() {
        let repeat = args.repeat.unwrap_or_else(|| default_repeat(&w.spec));
        for &sink in &plan.sinks {
            let mut runs = Vec::with_capacity(repeat);
            for i in 1..=repeat {
                let run = match rss {
                    RssMethod::ChildProcess => run_in_child(&args, &plan, w.spec.kind, sink)?,
                    _ => bench::run_once(
                        w,
                        &sink_of(sink, &plan),
                        &plan.opts,
                        rss == RssMethod::ClearRefs,
                    )
                    .map_err(CliError::failed)?,
                };
                bench::check_run(w, sink, &run).map_err(CliError::failed)?;
                eprintln!(
                    "narflow bench: {} → {}: run {i}/{repeat}: {:.3} s, {:.1} MB/s, peak RSS {}",
                    w.spec.kind.name(),
                    sink.name(),
                    run.seconds,
                    run.nar_bytes as f64 / 1e6 / run.seconds.max(1e-9),
                    run.peak_rss_bytes
                        .map_or_else(|| "-".into(), narflow::settings::format_size)
                );
                runs.push(run);
            }
            measured.push((wi, sink, runs));
        }
    }

    // 3. The ceiling of each workload: compression alone.
    let mut ceilings = Vec::new();
    for w in &workloads {
        let c = bench::measure_ceiling(
            w,
            plan.compression,
            plan.opts.chunk_size,
            plan.opts.jobs,
            bench::CEILING_SAMPLE_LIMIT,
            CEILING_PASSES,
        )
        .map_err(CliError::failed)?;
        eprintln!(
            "narflow bench: {}: ceiling {:.1} MB/s ({} alone on {} threads over {})",
            w.spec.kind.name(),
            c.mb_per_s,
            plan.compression.kind.nix_name(),
            c.threads,
            narflow::settings::format_size(c.sample_bytes)
        );
        ceilings.push(c);
    }

    let results = measured
        .iter()
        .map(|(wi, sink, runs)| {
            bench::summarise(&workloads[*wi], *sink, runs, Some(&ceilings[*wi]))
        })
        .collect();
    let mut report = BenchReport {
        version: bench::REPORT_VERSION,
        machine,
        settings: Settings {
            compression: plan.compression.kind.nix_name().to_owned(),
            level: plan.compression.level,
            jobs: plan.opts.jobs,
            memory_bytes: plan.opts.memory,
            chunk_size: plan.opts.chunk_size as u64,
            seed: args.seed,
            signed: true,
            rss_method: rss,
            page_cache: "warm".into(),
            statistic: "median run by time; peak RSS the largest of the runs".into(),
            ceiling_sample_limit_bytes: bench::CEILING_SAMPLE_LIMIT,
            mb: "1e6 bytes of NAR".into(),
        },
        results,
        ceilings,
        baseline: None,
    };

    let mut code = exit::OK;
    let mut comparison_text = String::new();
    if let Some((path, base)) = &baseline {
        let summary =
            bench::compare(path, base, &report, args.threshold).map_err(CliError::usage)?;
        comparison_text = bench::render_comparisons(&summary);
        if summary.regressions > 0 {
            code = exit::SOME_FAILED;
        }
        report.baseline = Some(summary);
    }
    if args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::failed(anyhow!("rendering the report: {e}")))?;
        println!("{json}");
        eprint!("{comparison_text}");
    } else {
        print!("{}", bench::render_table(&report));
        if !comparison_text.is_empty() {
            println!();
            print!("{comparison_text}");
        }
    }
    Ok(code)
}

/// `--internal-run`: one run of the one workload into the one sink; its figures as JSON on
/// stdout. The workload must have been prepared by the parent.
fn internal_run(plan: &Plan) -> Result<u8, CliError> {
    let ([kind], [sink]) = (plan.kinds.as_slice(), plan.sinks.as_slice()) else {
        return Err(usage(
            "--internal-run needs exactly one --workload and one --sink".into(),
        ));
    };
    let spec = WorkloadSpec::default_for(*kind, plan.seed, plan.large_size);
    let w = bench::open(&plan.dir, &spec).map_err(CliError::usage)?;
    let run =
        bench::run_once(&w, &sink_of(*sink, plan), &plan.opts, false).map_err(CliError::failed)?;
    let json = serde_json::to_string(&run)
        .map_err(|e| CliError::failed(anyhow!("rendering the run: {e}")))?;
    println!("{json}");
    Ok(exit::OK)
}

/// Runs one measurement in a fresh `narflow bench --internal-run` process, whose peak RSS
/// is its own from start to end.
fn run_in_child(
    args: &BenchArgs,
    plan: &Plan,
    kind: WorkloadKind,
    sink: SinkKind,
) -> Result<RunResult, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::failed(anyhow!("finding the narflow executable: {e}")))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["bench", "--internal-run", "--workload", kind.name()])
        .args(["--sink", sink.name()])
        .arg("--dir")
        .arg(&plan.dir)
        .args(["--seed", &args.seed.to_string()])
        .args(["--size", &plan.large_size.to_string()])
        .args(["--compression", plan.compression.kind.nix_name()])
        .args(["--level", &plan.compression.level.to_string()])
        .args(["--jobs", &plan.opts.jobs.to_string()])
        .args(["--memory", &plan.opts.memory.to_string()])
        .args(["--chunk-size", &plan.opts.chunk_size.to_string()])
        .args(["--rss", "child-process"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    if let Some(to) = &args.to {
        cmd.args(["--to", to]);
    }
    let out = cmd
        .output()
        .map_err(|e| CliError::failed(anyhow!("running {}: {e}", exe.display())))?;
    if !out.status.success() {
        return Err(CliError::failed(anyhow!(
            "the measuring process ({} bench --internal-run) failed: {}",
            exe.display(),
            out.status
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        CliError::failed(anyhow!(
            "the measuring process ({}) printed no run figures: {e}",
            exe.display()
        ))
    })
}
