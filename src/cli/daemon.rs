//! `narflow daemon`: the long-running uploader behind `narflow hook`.
use super::CliError;
use narflow::cache;
use narflow::daemon::{DEFAULT_BATCH, Daemon, DaemonConfig, DaemonError};
use narflow::format::store_path::DEFAULT_STORE_DIR;
use narflow::settings::{JournalFile, Merged, Settings, SettingsError};
use narflow::store::LocalStore;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub settings: Settings,
    /// Most paths taken from the queue per upload batch.
    #[arg(long, default_value_t = DEFAULT_BATCH, hide = true)]
    pub batch: usize,
}

pub fn run(args: &DaemonArgs, merged: &Merged) -> Result<u8, CliError> {
    let resolved = merged.resolve().map_err(CliError::usage)?;
    let url = resolved.cache_url().map_err(CliError::usage)?;
    let opts = resolved.push_options().map_err(CliError::usage)?;
    let mut open_opts = opts.cache_options(resolved.s3.clone());
    // The daemon keeps its records in its queue database, never in a file of their own.
    let resume = match &resolved.upload_journal {
        None => true,
        Some(JournalFile::Off) => false,
        Some(JournalFile::File(_)) => {
            return Err(CliError::usage(SettingsError::Invalid {
                key: "upload-journal",
                from: resolved.source("upload-journal"),
                message: "the daemon records unfinished uploads in its queue; give off or nothing"
                    .into(),
            }));
        }
    };
    let resume = resume && matches!(url.location, cache::url::CacheLocation::S3 { .. });
    let socket_group = resolved
        .socket_group
        .as_deref()
        .map(|g| {
            group_id(g).map_err(|message| SettingsError::Invalid {
                key: "daemon.socket-group",
                from: resolved.source("daemon.socket-group"),
                message,
            })
        })
        .transpose()
        .map_err(CliError::usage)?;
    let cfg = DaemonConfig {
        socket: resolved.socket.clone(),
        state_dir: resolved.state_dir.clone(),
        socket_group,
        opts,
        batch: args.batch,
        shutdown_timeout: resolved.shutdown_timeout,
        metrics_listen: resolved.metrics_listen,
        watch_store: resolved.watch_store,
        resume_max_age: resume.then_some(resolved.resume_max_age),
    };
    let daemon = Daemon::bind(cfg).map_err(CliError::usage)?;
    open_opts.journal = daemon.journal();
    let cache = match cache::open(url, &open_opts) {
        Ok(c) => c,
        Err(e) => {
            daemon.release();
            return Err(CliError::usage(e));
        }
    };
    let store = LocalStore::open(DEFAULT_STORE_DIR, Path::new("/nix/var/nix/db/db.sqlite"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::usage)?;
    let shutdown = {
        use tokio::signal::unix::{SignalKind, signal};
        let _in_rt = rt.enter();
        let mut term = signal(SignalKind::terminate()).map_err(CliError::usage)?;
        let mut int = signal(SignalKind::interrupt()).map_err(CliError::usage)?;
        async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        }
    };
    let result = rt.block_on(daemon.run(store, cache, shutdown));
    // Nothing on the runtime is worth waiting for now (an upload still running is on the
    // worker's own thread, and stays queued).
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(()) => Ok(super::exit::OK),
        Err(e @ DaemonError::WorkerDied) => Err(CliError::failed(e)),
        Err(e) => Err(CliError::usage(e)),
    }
}

/// A group's id, from a number or a name in the system's group database.
fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    uzers::get_group_by_name(name)
        .map(|g| g.gid())
        .ok_or_else(|| format!("no such group {name:?}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn groups_by_number_or_by_name() {
        assert_eq!(super::group_id("4242"), Ok(4242));
        // Every Unix system has group 0, named root (wheel on some BSDs).
        assert_eq!(super::group_id("root"), Ok(0));
        let e = super::group_id("no-such-group-narflow").unwrap_err();
        assert!(e.contains("no such group \"no-such-group-narflow\""), "{e}");
    }
}
