//! Drawing progress: indicatif bars when stderr is a terminal, tracing lines otherwise.
//! Failures are always printed, one line each, whatever the mode.
use narflow::pipeline::{Outcome, PathResult, Progress};

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
