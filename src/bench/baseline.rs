//! Baselines: comparing a report with a saved one, and the regressions CI fails on.

use super::*;

/// One figure compared with the baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub workload: String,
    pub sink: String,
    /// `mb_per_s`, `paths_per_s` (higher is better) or `peak_rss_bytes` (lower is better).
    pub metric: String,
    pub baseline: f64,
    pub current: f64,
    /// Signed change of the value, percent of the baseline.
    pub change_pct: f64,
    /// How much worse, percent (negative when better).
    pub worse_pct: f64,
    pub regressed: bool,
}

/// The comparison of a report with a baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineSummary {
    pub file: String,
    pub threshold_pct: f64,
    pub comparisons: Vec<Comparison>,
    /// Results of this run the baseline has nothing to compare with (`workload/sink`).
    pub unmatched: Vec<String>,
    pub regressions: usize,
}

/// Reads a saved `--json` report.
///
/// # Errors
/// [`BenchError::File`] naming `path` when it cannot be read, is not a report, or is of
/// another report version.
pub fn read_baseline(path: &Path) -> Result<BenchReport, BenchError> {
    let bad = |reason: String| BenchError::File {
        path: path.to_owned(),
        reason,
    };
    let text = fs::read(path).map_err(|e| bad(format!("cannot read the baseline: {e}")))?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not a JSON bench report: {e}")))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(REPORT_VERSION) => {}
        Some(v) => {
            return Err(bad(format!(
                "report version {v}, this narflow writes {REPORT_VERSION}"
            )));
        }
        None => return Err(bad("not a bench report (no \"version\")".into())),
    }
    serde_json::from_value(value).map_err(|e| bad(format!("not a bench report: {e}")))
}

/// Compares `current` with `baseline` (read from `file`): for each (workload, sink) in
/// both, MB/s and paths/s (higher is better) and peak RSS (lower is better). A figure is
/// a regression when it is more than `threshold_pct` worse; for peak RSS it must also have
/// grown by more than [`RSS_SLACK_BYTES`].
///
/// # Errors
/// [`BenchError::File`] naming `file` when the two cannot be compared: other compression
/// settings, a workload with other parameters, or no result in common.
pub fn compare(
    file: &Path,
    baseline: &BenchReport,
    current: &BenchReport,
    threshold_pct: f64,
) -> Result<BaselineSummary, BenchError> {
    let bad = |reason: String| BenchError::File {
        path: file.to_owned(),
        reason,
    };
    let (b, c) = (&baseline.settings, &current.settings);
    if (b.compression.as_str(), b.level) != (c.compression.as_str(), c.level) {
        return Err(bad(format!(
            "the baseline was measured with {}-{}, this run with {}-{}: not comparable",
            b.compression, b.level, c.compression, c.level
        )));
    }
    let mut comparisons = Vec::new();
    let mut unmatched = Vec::new();
    for cur in &current.results {
        let Some(base) = baseline
            .results
            .iter()
            .find(|r| r.workload == cur.workload && r.sink == cur.sink)
        else {
            unmatched.push(format!("{}/{}", cur.workload, cur.sink));
            continue;
        };
        if base.spec != cur.spec {
            return Err(bad(format!(
                "{}: the baseline's workload is {} (seed {}), this run's is {} (seed {}): not comparable",
                cur.workload,
                base.spec.describe(),
                base.spec.seed,
                cur.spec.describe(),
                cur.spec.seed
            )));
        }
        let mut push = |metric: &str, bv: f64, cv: f64, higher_is_better: bool, slack: f64| {
            if bv <= 0.0 {
                return;
            }
            let change_pct = 100.0 * (cv - bv) / bv;
            let worse_pct = if higher_is_better {
                -change_pct
            } else {
                change_pct
            };
            let worse_abs = if higher_is_better { bv - cv } else { cv - bv };
            comparisons.push(Comparison {
                workload: cur.workload.clone(),
                sink: cur.sink.clone(),
                metric: metric.to_owned(),
                baseline: bv,
                current: cv,
                change_pct,
                worse_pct,
                regressed: worse_pct > threshold_pct && worse_abs > slack,
            });
        };
        push("mb_per_s", base.mb_per_s, cur.mb_per_s, true, 0.0);
        push("paths_per_s", base.paths_per_s, cur.paths_per_s, true, 0.0);
        if let (Some(bv), Some(cv)) = (base.peak_rss_bytes, cur.peak_rss_bytes) {
            push(
                "peak_rss_bytes",
                bv as f64,
                cv as f64,
                false,
                RSS_SLACK_BYTES as f64,
            );
        }
    }
    if comparisons.is_empty() {
        return Err(bad(format!(
            "no result in common with this run (baseline has {}; this run has {})",
            list_results(baseline),
            list_results(current)
        )));
    }
    let regressions = comparisons.iter().filter(|c| c.regressed).count();
    Ok(BaselineSummary {
        file: file.display().to_string(),
        threshold_pct,
        comparisons,
        unmatched,
        regressions,
    })
}

pub(super) fn list_results(r: &BenchReport) -> String {
    let v: Vec<String> = r
        .results
        .iter()
        .map(|x| format!("{}/{}", x.workload, x.sink))
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// One line per comparison, then the verdict.
pub fn render_comparisons(s: &BaselineSummary) -> String {
    use std::fmt::Write as _;
    let mut out = format!("baseline {} (threshold {}%):\n", s.file, s.threshold_pct);
    for c in &s.comparisons {
        let (label, fmt): (&str, fn(f64) -> String) = match c.metric.as_str() {
            "mb_per_s" => ("MB/s", |v| format!("{v:.1}")),
            "paths_per_s" => ("paths/s", |v| format!("{v:.1}")),
            _ => ("peak RSS", |v| format!("{:.1} MiB", v / MIB)),
        };
        let verdict = if c.regressed {
            format!(
                "REGRESSION ({:.1}% worse > {}%)",
                c.worse_pct, s.threshold_pct
            )
        } else if c.worse_pct > 0.0 {
            "ok (worse, within threshold)".into()
        } else {
            "ok".into()
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<9} {:>12} → {:>12}  {:>+7.1}%  {verdict}",
            format!("{}/{}", c.workload, c.sink),
            label,
            fmt(c.baseline),
            fmt(c.current),
            c.change_pct
        );
    }
    for u in &s.unmatched {
        let _ = writeln!(out, "  {u:<16} not in the baseline: not compared");
    }
    let _ = writeln!(
        out,
        "{} regression{} of {} comparisons",
        s.regressions,
        if s.regressions == 1 { "" } else { "s" },
        s.comparisons.len()
    );
    out
}
