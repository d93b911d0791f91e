//! Peak RSS and CPU time of this process, read from `/proc`.

use super::*;

/// How peak RSS is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RssMethod {
    /// In this process: the peak is reset before each run by writing `5` to
    /// `/proc/self/clear_refs`, then read as `VmHWM` from `/proc/self/status`.
    ClearRefs,
    /// Each run in a fresh child process, which reports its own `VmHWM`.
    ChildProcess,
    /// No `/proc/self/status`: no RSS figures.
    Unavailable,
}

impl RssMethod {
    /// Finds out what works here: [`RssMethod::ClearRefs`] when a reset visibly lowers
    /// `VmHWM`, else [`RssMethod::ChildProcess`] when `VmHWM` can be read at all.
    pub fn detect() -> Self {
        let Some(_) = status_bytes("VmHWM") else {
            return RssMethod::Unavailable;
        };
        // Touch 48 MiB (more than glibc's largest mmap threshold, so it is unmapped when
        // freed), then reset and check the peak fell.
        let mut v = vec![0u8; 48 << 20];
        for b in v.iter_mut().step_by(4096) {
            *b = 1;
        }
        std::hint::black_box(&v);
        drop(v);
        let high = status_bytes("VmHWM").unwrap_or(0);
        if reset_peak_rss().is_err() {
            return RssMethod::ChildProcess;
        }
        match status_bytes("VmHWM") {
            Some(after) if after + (32 << 20) <= high => RssMethod::ClearRefs,
            _ => RssMethod::ChildProcess,
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            RssMethod::ClearRefs => "clear-refs",
            RssMethod::ChildProcess => "child-process",
            RssMethod::Unavailable => "unavailable",
        }
    }

    /// One line for the human report.
    pub fn describe(self) -> &'static str {
        match self {
            RssMethod::ClearRefs => {
                "in process: /proc/self/clear_refs reset before each run, VmHWM after it"
            }
            RssMethod::ChildProcess => "one child process per run, its VmHWM at the end",
            RssMethod::Unavailable => "not measured (no /proc/self/status)",
        }
    }
}

/// A `kB` field of `/proc/self/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// User + system CPU time of this process so far, all threads, from `/proc/self/stat`
/// (in clock ticks of 1/100 s, the value of `USER_HZ` on every Linux architecture narflow
/// builds for).
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS (Linux ≥ 4.0).
///
/// # Errors
/// When `/proc/self/clear_refs` cannot be written.
pub fn reset_peak_rss() -> io::Result<()> {
    fs::write("/proc/self/clear_refs", "5")
}
