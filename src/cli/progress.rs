//! Drawing progress: indicatif bars when stderr is a terminal, tracing lines otherwise.
//! Failures are always printed, one line each, whatever the mode.
use narflow::pipeline::outcome::{Outcome, PathResult, Progress};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct CliProgress {
    /// `None` when stderr is not a terminal.
    bar: Option<indicatif::ProgressBar>,
}

impl CliProgress {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} NAR {binary_bytes_per_sec} {msg}",
                )
                .expect("valid template"),
            );
            bar
        });
        CliProgress { bar }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Progress for CliProgress {
    fn planned(&self, paths: usize, nar_bytes: u64) {
        tracing::info!(
            "{paths} paths to upload ({} of NAR)",
            narflow::settings::format_size(nar_bytes)
        );
        if let Some(bar) = &self.bar {
            bar.set_length(nar_bytes);
            bar.set_message(format!("0/{paths} paths"));
        }
    }
    fn nar_bytes(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }
    fn finished(&self, r: &PathResult) {
        match &r.outcome {
            Outcome::Uploaded {
                nar_size,
                file_size,
            } => {
                tracing::info!("uploaded {} ({nar_size} → {file_size} bytes)", r.path)
            }
            Outcome::AlreadyPresent => tracing::info!("already in cache: {}", r.path),
            Outcome::Failed(why) => {
                let line = format!("narflow: {}: {why}", r.path);
                match &self.bar {
                    Some(bar) => bar.println(line),
                    None => eprintln!("{line}"),
                }
            }
        }
    }
}

/// A backfill's progress: on a terminal a bar of paths settled out of the total, with the
/// NAR bytes uploaded, their rate and the ETA; otherwise one line a minute on stderr.
#[derive(Debug)]
pub struct BackfillBar {
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    total: AtomicU64,
    done: AtomicU64,
    bytes: AtomicU64,
    /// When the last line was printed (without a terminal).
    last_line: std::sync::Mutex<std::time::Instant>,
}

/// How often a backfill without a terminal says where it is.
const LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl BackfillBar {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} paths {msg} ETA {eta}",
                )
                .expect("valid template"),
            );
            bar
        });
        let now = std::time::Instant::now();
        BackfillBar {
            bar,
            started: now,
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_line: std::sync::Mutex::new(now),
        }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Bytes so far and their rate, for the bar's message and the minute lines.
    fn bytes_and_rate(&self) -> String {
        let bytes = self.bytes.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{} NAR, {}/s",
            narflow::settings::format_size(bytes),
            narflow::settings::format_size((bytes as f64 / secs) as u64)
        )
    }

    fn tick(&self) {
        if let Some(bar) = &self.bar {
            bar.set_message(self.bytes_and_rate());
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() < LINE_EVERY {
            return;
        }
        *last = std::time::Instant::now();
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = match done {
            0 => "unknown".to_owned(),
            d => format!(
                "{:.0} s",
                elapsed / d as f64 * total.saturating_sub(d) as f64
            ),
        };
        eprintln!(
            "narflow: backfill: {done}/{total} paths, {}, ETA {eta}",
            self.bytes_and_rate()
        );
    }
}

impl narflow::backfill::BackfillProgress for BackfillBar {
    fn total(&self, paths: u64, _nar_bytes: u64) {
        self.total.store(paths, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(paths);
        }
    }
    fn advanced(&self, paths: u64) {
        self.done.fetch_add(paths, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(paths);
        }
        self.tick();
    }
    fn nar_bytes(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn finished(&self, r: &PathResult) {
        if let Outcome::Failed(why) = &r.outcome {
            let line = format!("narflow: {}: {why}", r.path);
            match &self.bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
        } else {
            tracing::info!("uploaded {}", r.path);
        }
    }
}

/// `narflow verify`'s progress, on a terminal only: a bar of narinfos checked (of NAR
/// bytes read, with `--contents`). Problems printed while it is drawn go above it.
#[derive(Debug)]
pub struct VerifyBar {
    bar: Option<indicatif::ProgressBar>,
    /// The bar counts NAR bytes (`--contents`) rather than narinfos.
    bytes: std::sync::atomic::AtomicBool,
    narinfos: AtomicU64,
    total: AtomicU64,
}

impl VerifyBar {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr()
            .is_terminal()
            .then(|| indicatif::ProgressBar::new(0));
        VerifyBar {
            bar,
            bytes: std::sync::atomic::AtomicBool::new(false),
            narinfos: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    /// Prints a line on stdout, above the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    pub fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl narflow::maintain::verify::VerifyProgress for VerifyBar {
    fn listed(&self, narinfos: u64, nar_bytes: u64) {
        let Some(bar) = &self.bar else { return };
        self.total.store(narinfos, Ordering::Relaxed);
        let template = if nar_bytes > 0 {
            self.bytes.store(true, Ordering::Relaxed);
            bar.set_length(nar_bytes);
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} of NARs {binary_bytes_per_sec} {msg}"
        } else {
            bar.set_length(narinfos);
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} narinfos ETA {eta}"
        };
        bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template"));
    }
    fn narinfos(&self, n: u64) {
        let Some(bar) = &self.bar else { return };
        let done = self.narinfos.fetch_add(n, Ordering::Relaxed) + n;
        if self.bytes.load(Ordering::Relaxed) {
            bar.set_message(format!(
                "{done}/{} narinfos",
                self.total.load(Ordering::Relaxed)
            ));
        } else {
            bar.inc(n);
        }
    }
    fn nar_bytes(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }
}
