//! Runs: one push of a workload through the real pipeline into a sink, with its figures.

use super::*;

/// Where a run pushes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkKind {
    /// [`NullCache`]: uploads are counted and dropped; measures the pipeline alone.
    Null,
    /// A `file://` cache: a fresh directory per run, removed afterwards.
    File,
}

impl SinkKind {
    pub const ALL: [SinkKind; 2] = [SinkKind::Null, SinkKind::File];

    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Null => "null",
            SinkKind::File => "file",
        }
    }

    /// Parses a sink name.
    ///
    /// # Errors
    /// A message naming the value and the accepted ones.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown sink {s:?} (null or file)"))
    }
}

/// A sink with what it needs: for `file`, the directory in which each run creates (and
/// afterwards removes) a fresh cache directory, so every run uploads everything.
#[derive(Debug, Clone)]
pub enum Sink {
    Null,
    File { parent: PathBuf },
}

impl Sink {
    pub fn kind(&self) -> SinkKind {
        match self {
            Sink::Null => SinkKind::Null,
            Sink::File { .. } => SinkKind::File,
        }
    }
}

/// The key bench runs sign with, so narinfo signing costs what it costs in a real push.
pub fn bench_key() -> SigningKey {
    SigningKey::from_seed("narflow-bench-1", [0x42; 32])
}

/// One stage's figures in one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageFigures {
    pub name: String,
    pub threads: usize,
    /// Time spent working, summed over threads.
    pub busy_seconds: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Input MB per second of busy time per thread: what the stage sustains with all its
    /// threads busy (the sink's input is compressed bytes, the others' NAR bytes).
    pub mb_per_s: f64,
    /// busy ÷ (wall × threads): 1.0 means the stage never waited.
    pub utilisation: f64,
}

impl StageFigures {
    /// Figures of `s` in a run that took `wall`.
    pub fn from_stats(s: &StageStats, wall: Duration) -> Self {
        let busy = s.busy.as_secs_f64();
        let per_thread = busy / s.threads.max(1) as f64;
        StageFigures {
            name: s.name.to_owned(),
            threads: s.threads,
            busy_seconds: busy,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            mb_per_s: if per_thread > 0.0 {
                s.bytes_in as f64 / MB / per_thread
            } else {
                0.0
            },
            utilisation: s.utilisation(wall),
        }
    }
}

/// Below this utilisation the busiest stage is not called saturated in the human report:
/// the run was bound by latency (hand-offs, the publisher, other processes), not by a stage.
pub(super) const SATURATED: f64 = 0.5;

/// The stage with the highest utilisation: the one the others wait for.
pub fn bottleneck(stages: &[StageFigures]) -> Option<&StageFigures> {
    stages
        .iter()
        .max_by(|a, b| a.utilisation.total_cmp(&b.utilisation))
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub seconds: f64,
    pub paths: usize,
    pub uploaded: usize,
    pub failed: usize,
    /// The first few failures, `path: why`.
    pub failures: Vec<String>,
    pub nar_bytes: u64,
    pub file_bytes: u64,
    /// CPU time of the whole process during the run, user + system (`None` without
    /// `/proc/self/stat`). Unlike stage busy times it does not grow when the machine is
    /// busy with other work, so it shows the pipeline's own cost.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    /// Peak RSS during the run (`None` when it cannot be measured).
    pub peak_rss_bytes: Option<u64>,
    /// RSS when the run started: the floor under `peak_rss_bytes`.
    pub rss_start_bytes: Option<u64>,
    pub stages: Vec<StageFigures>,
}

/// Pushes all of `w` once through the real pipeline into `sink` and measures it. With
/// `reset_rss`, the process's peak RSS is reset first (see [`RssMethod::ClearRefs`]);
/// otherwise the peak is the process's whole life (a fresh child process).
///
/// Only the pipeline is timed: creating and removing a `file` sink's directory is not.
///
/// # Errors
/// [`BenchError::Io`] when the cache directory cannot be made, [`BenchError::Push`] when
/// the pipeline cannot run. Failed paths are reported in the result, not as an error.
pub fn run_once(
    w: &Workload,
    sink: &Sink,
    opts: &PushOptions,
    reset_rss: bool,
) -> Result<RunResult, BenchError> {
    let workload = w.spec.kind.name().to_owned();
    let push_err = |source| BenchError::Push {
        workload: workload.clone(),
        sink: sink.kind().name(),
        source: Box::new(source),
    };
    let mut tmp = None;
    let cache: Box<dyn BinaryCache> = match sink {
        Sink::Null => Box::new(NullCache::new()),
        Sink::File { parent } => {
            mkdir(parent)?;
            let dir = tempfile::Builder::new()
                .prefix("narflow-bench-cache-")
                .tempdir_in(parent)
                .map_err(io_error(parent))?;
            let url = format!("file://{}", dir.path().display());
            let cache = FileCache::open(dir.path(), &url).map_err(|e| push_err(e.into()))?;
            tmp = Some(dir);
            Box::new(cache)
        }
    };
    cache
        .ensure_cache_info(&w.store_dir)
        .map_err(|e| push_err(e.into()))?;
    if reset_rss {
        // Failure only means the peak covers more than this run; detect() checked it works.
        let _ = reset_peak_rss();
    }
    let rss_start_bytes = status_bytes("VmRSS");
    let cpu_start = process_cpu_seconds();
    let report = pipeline::upload(cache.as_ref(), &w.store_dir, &w.infos, opts, &NoProgress)
        .map_err(push_err)?;
    let peak_rss_bytes = status_bytes("VmHWM");
    let cpu_seconds = process_cpu_seconds()
        .zip(cpu_start)
        .map(|(end, start)| end - start);
    drop(cache);
    drop(tmp);
    let failures: Vec<String> = report
        .failed()
        .take(3)
        .map(|r| match &r.outcome {
            Outcome::Failed(why) => format!("{}: {why}", r.path),
            _ => r.path.clone(),
        })
        .collect();
    Ok(RunResult {
        seconds: report.elapsed.as_secs_f64(),
        paths: w.infos.len(),
        uploaded: report.count(|o| matches!(o, Outcome::Uploaded { .. })),
        failed: report.failed().count(),
        failures,
        nar_bytes: report.bytes.nar,
        file_bytes: report.bytes.file,
        cpu_seconds,
        peak_rss_bytes,
        rss_start_bytes,
        stages: report
            .stages
            .iter()
            .map(|s| StageFigures::from_stats(s, report.elapsed))
            .collect(),
    })
}

/// Turns a run with failed paths into an error (a benchmark of a failing push means
/// nothing).
///
/// # Errors
/// [`BenchError::PathsFailed`] naming the first failure.
pub fn check_run(w: &Workload, sink: SinkKind, run: &RunResult) -> Result<(), BenchError> {
    if run.failed == 0 && run.uploaded == run.paths {
        return Ok(());
    }
    Err(BenchError::PathsFailed {
        workload: w.spec.kind.name().to_owned(),
        sink: sink.name(),
        failed: run.failed.max(run.paths - run.uploaded.min(run.paths)),
        paths: run.paths,
        first: run
            .failures
            .first()
            .cloned()
            .unwrap_or_else(|| "(not uploaded)".into()),
    })
}
