//! Peak RSS and CPU time of this process.
//!
//! CPU time comes from the kernel's process clock (rustix). Peak RSS is `VmHWM` of
//! `/proc/self/status`, reset through `/proc/self/clear_refs`; these two stay hand-written:
//! the `procfs` crate (default features off) would add procfs-core, hex and about 25 CPU
//! seconds to a release build for two one-line reads, and neither std nor rustix has them
//! (`getrusage`'s `ru_maxrss` is the whole life's peak and cannot be reset).

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

/// User + system CPU time of this process so far, all threads: the kernel's
/// `CLOCK_PROCESS_CPUTIME_ID`, in nanoseconds, with no clock-tick unit to assume. Always
/// `Some` on Linux; an `Option` for the reports, which leave the figure out without it.
pub fn process_cpu_seconds() -> Option<f64> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Some(t.tv_sec as f64 + t.tv_nsec as f64 / 1e9)
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS (Linux ≥ 4.0).
///
/// # Errors
/// When `/proc/self/clear_refs` cannot be written.
pub fn reset_peak_rss() -> io::Result<()> {
    fs::write("/proc/self/clear_refs", "5")
}
