//! Reports: the machine, the `--json` report and the human table.

use super::*;

/// The machine a report was made on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_bytes: u64,
    pub kernel: String,
    /// CPU features that change the figures: `sha_ni` (SHA-256), `avx2`, `avx512f`.
    pub cpu_features: Vec<String>,
    pub narflow_version: String,
    /// 1, 5 and 15-minute load averages before the runs: a busy machine makes
    /// slower figures.
    #[serde(default)]
    pub load_average: Vec<f64>,
}

impl Machine {
    /// Reads `/proc` (fields stay empty where it cannot).
    pub fn detect() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == name).then(|| v.trim().to_owned())
                })
                .unwrap_or_default()
        };
        let flags = field("flags");
        let cpu_features = ["sha_ni", "avx2", "avx512f"]
            .into_iter()
            .filter(|f| flags.split_whitespace().any(|x| x == *f))
            .map(str::to_owned)
            .collect();
        let memory_bytes = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    let kb = l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?;
                    kb.trim().parse::<u64>().ok()
                })
            })
            .map_or(0, |kb| kb * 1024);
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu: field("model name"),
            memory_bytes,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            cpu_features,
            narflow_version: env!("CARGO_PKG_VERSION").to_owned(),
            load_average: fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .take(3)
                .filter_map(|v| v.parse().ok())
                .collect(),
        }
    }
}

/// How the figures were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub compression: String,
    pub level: i32,
    /// Compression threads.
    pub jobs: usize,
    pub memory_bytes: u64,
    pub chunk_size: u64,
    pub seed: u64,
    /// Narinfos are signed (with [`bench_key`]).
    pub signed: bool,
    pub rss_method: RssMethod,
    /// Runs read the workload from a warm page cache (it was read once before).
    pub page_cache: String,
    /// Results are the median run (by time) of `runs`; peak RSS is the largest of them.
    pub statistic: String,
    pub ceiling_sample_limit_bytes: u64,
    /// What MB means in MB/s.
    pub mb: String,
}

/// The end-to-end figures of one workload into one sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchResult {
    pub workload: String,
    pub sink: String,
    pub spec: WorkloadSpec,
    pub paths: usize,
    pub nar_bytes: u64,
    pub file_bytes: u64,
    /// NAR bytes ÷ compressed bytes.
    pub compression_ratio: f64,
    pub runs: usize,
    /// The median run's time, and every run's.
    pub seconds: f64,
    pub seconds_all: Vec<f64>,
    /// NAR MB per second.
    pub mb_per_s: f64,
    pub paths_per_s: f64,
    /// The median run's process CPU time, and CPU seconds per GB of NAR (comparable with
    /// the ceiling's: the difference is what the pipeline spends beyond compression).
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
    #[serde(default)]
    pub cpu_seconds_per_gb: Option<f64>,
    /// CPU seconds ÷ wall seconds: how many cores the run kept busy. Near the core count
    /// with no stage saturated means the CPU went to hand-offs and spinning between
    /// threads rather than to a stage's work.
    #[serde(default)]
    pub cpu_cores_used: Option<f64>,
    /// The largest peak over the runs.
    pub peak_rss_bytes: Option<u64>,
    pub rss_start_bytes: Option<u64>,
    /// The median run's stages.
    pub stages: Vec<StageFigures>,
    pub bottleneck: Option<String>,
    /// The bottleneck's utilisation: well below 1.0 means no stage was saturated and the
    /// time went to hand-offs between threads, the publisher, or other processes.
    pub bottleneck_utilisation: Option<f64>,
    pub ceiling_mb_per_s: Option<f64>,
    pub pct_of_ceiling: Option<f64>,
    /// The ceiling's CPU s/GB ÷ this result's, percent: the share of the ceiling a
    /// CPU-bound machine can reach at most. Unlike `pct_of_ceiling` it hardly depends on
    /// other load on the machine (absent when either CPU time is too short to measure).
    #[serde(default)]
    pub cpu_pct_of_ceiling: Option<f64>,
}

/// Summarises `runs` (at least one) of `w` into `sink`: the median run by time, the
/// largest peak RSS, and the share of `ceiling` reached.
pub fn summarise(
    w: &Workload,
    sink: SinkKind,
    runs: &[RunResult],
    ceiling: Option<&Ceiling>,
) -> BenchResult {
    assert!(!runs.is_empty(), "summarise needs at least one run");
    let mut by_time: Vec<&RunResult> = runs.iter().collect();
    by_time.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let median = by_time[(by_time.len() - 1) / 2];
    let mb_per_s = rate(median.nar_bytes as f64 / MB, median.seconds);
    let ceiling_mb_per_s = ceiling.map(|c| c.mb_per_s);
    BenchResult {
        workload: w.spec.kind.name().to_owned(),
        sink: sink.name().to_owned(),
        spec: w.spec.clone(),
        paths: median.paths,
        nar_bytes: median.nar_bytes,
        file_bytes: median.file_bytes,
        compression_ratio: if median.file_bytes > 0 {
            median.nar_bytes as f64 / median.file_bytes as f64
        } else {
            0.0
        },
        runs: runs.len(),
        seconds: median.seconds,
        seconds_all: runs.iter().map(|r| r.seconds).collect(),
        mb_per_s,
        paths_per_s: rate(median.paths as f64, median.seconds),
        cpu_seconds: median.cpu_seconds,
        cpu_cores_used: median
            .cpu_seconds
            .filter(|_| median.seconds > 0.0)
            .map(|c| c / median.seconds),
        cpu_seconds_per_gb: median
            .cpu_seconds
            .filter(|_| median.nar_bytes > 0)
            .map(|c| c / (median.nar_bytes as f64 / 1e9)),
        peak_rss_bytes: runs.iter().filter_map(|r| r.peak_rss_bytes).max(),
        rss_start_bytes: runs.iter().filter_map(|r| r.rss_start_bytes).max(),
        stages: median.stages.clone(),
        bottleneck: bottleneck(&median.stages).map(|s| s.name.clone()),
        bottleneck_utilisation: bottleneck(&median.stages).map(|s| s.utilisation),
        ceiling_mb_per_s,
        pct_of_ceiling: ceiling_mb_per_s
            .filter(|c| *c > 0.0)
            .map(|c| 100.0 * mb_per_s / c),
        cpu_pct_of_ceiling: ceiling
            .and_then(Ceiling::cpu_seconds_per_gb)
            .zip(median.cpu_seconds.filter(|c| *c >= MIN_CPU_SECONDS))
            .filter(|_| median.nar_bytes > 0)
            .map(|(ceil, cpu)| 100.0 * ceil / (cpu / (median.nar_bytes as f64 / 1e9))),
    }
}

/// The whole `--json` report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub version: u32,
    pub machine: Machine,
    pub settings: Settings,
    pub results: Vec<BenchResult>,
    #[serde(default)]
    pub ceilings: Vec<Ceiling>,
    /// The comparison with `--baseline`, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineSummary>,
}

pub(super) fn opt_mib(b: Option<u64>) -> String {
    b.map_or_else(|| "-".into(), |b| format!("{:.1}", b as f64 / MIB))
}

/// The human report: settings, one row per result, then the stage figures.
pub fn render_table(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let s = &r.settings;
    let m = &r.machine;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "narflow bench: {}-{}, {} compression threads, {} memory budget, {} chunks, signed narinfos",
        s.compression,
        s.level,
        s.jobs,
        format_size(s.memory_bytes),
        format_size(s.chunk_size)
    );
    let _ = writeln!(
        out,
        "machine: {} cores ({}), {} RAM, kernel {}{}",
        m.cores,
        if m.cpu.is_empty() {
            "unknown CPU"
        } else {
            &m.cpu
        },
        format_size(m.memory_bytes),
        m.kernel,
        if m.cpu_features.is_empty() {
            String::new()
        } else {
            format!(", {}", m.cpu_features.join(" "))
        }
    );
    if let Some(load) = m.load_average.first() {
        let _ = writeln!(
            out,
            "load average {load:.2} before the runs{}",
            if *load > m.cores as f64 * 0.5 {
                " (a busy machine: figures are pessimistic)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "runs read the workload from a warm page cache; figures are the median run; MB = 10^6 bytes of NAR"
    );
    let _ = writeln!(
        out,
        "peak RSS: {} (the largest over the runs)",
        s.rss_method.describe()
    );
    let _ = writeln!(
        out,
        "CPU s/GB: process CPU time (user + system) per GB of NAR; CPU %: the ceiling's CPU s/GB \
         over the run's, the share of the ceiling a CPU-bound machine can reach (robust to other load); \
         cores: CPU seconds per wall second"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<11} {:<4} {:>6} {:>9} {:>5} {:>4} {:>8} {:>8} {:>9} {:>8} {:>6} {:>6} {:>8} {:>5} {:>8}  bottleneck",
        "workload",
        "sink",
        "paths",
        "NAR MiB",
        "ratio",
        "runs",
        "seconds",
        "MB/s",
        "paths/s",
        "ceiling",
        "% ceil",
        "CPU %",
        "CPU s/GB",
        "cores",
        "RSS MiB"
    );
    for x in &r.results {
        let _ = writeln!(
            out,
            "{:<11} {:<4} {:>6} {:>9.1} {:>5.2} {:>4} {:>8.3} {:>8.1} {:>9.1} {:>8} {:>6} {:>6} {:>8} {:>5} {:>8}  {}",
            x.workload,
            x.sink,
            x.paths,
            x.nar_bytes as f64 / MIB,
            x.compression_ratio,
            x.runs,
            x.seconds,
            x.mb_per_s,
            x.paths_per_s,
            x.ceiling_mb_per_s
                .map_or_else(|| "-".into(), |c| format!("{c:.1}")),
            x.pct_of_ceiling
                .map_or_else(|| "-".into(), |p| format!("{p:.0}%")),
            x.cpu_pct_of_ceiling
                .map_or_else(|| "-".into(), |p| format!("{p:.0}%")),
            x.cpu_seconds_per_gb
                .map_or_else(|| "-".into(), |c| format!("{c:.2}")),
            x.cpu_cores_used
                .map_or_else(|| "-".into(), |c| format!("{c:.2}")),
            opt_mib(x.peak_rss_bytes),
            match bottleneck(&x.stages) {
                Some(b) if b.utilisation < SATURATED => format!(
                    "none saturated ({} {:.0}% busy)",
                    b.name,
                    100.0 * b.utilisation
                ),
                Some(b) => format!("{} ({:.0}% busy)", b.name, 100.0 * b.utilisation),
                None => "-".into(),
            }
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "stages: threads × input MB/s per busy second (all threads busy), utilisation = busy ÷ (wall × threads)"
    );
    for x in &r.results {
        let cells: Vec<String> = x
            .stages
            .iter()
            .map(|st| {
                format!(
                    "{} {}× {:.0} MB/s {:.0}%",
                    st.name,
                    st.threads,
                    st.mb_per_s,
                    100.0 * st.utilisation
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  {:<11} {:<4}  {}",
            x.workload,
            x.sink,
            cells.join("   ")
        );
    }
    if !r.ceilings.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "ceiling: {}-{} alone, chunk by chunk on a pool of {} threads, best of passes:",
            s.compression, s.level, s.jobs
        );
        for c in &r.ceilings {
            let _ = writeln!(
                out,
                "  {:<11} {:>8.1} MB/s over {} of NAR in {} chunks (ratio {:.2}, {} CPU s/GB)",
                c.workload,
                c.mb_per_s,
                format_size(c.sample_bytes),
                c.chunks,
                if c.compressed_bytes > 0 {
                    c.sample_bytes as f64 / c.compressed_bytes as f64
                } else {
                    0.0
                },
                c.cpu_seconds_per_gb()
                    .map_or_else(|| "-".into(), |c| format!("{c:.2}"))
            );
        }
    }
    out
}
