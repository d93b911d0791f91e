//! `narflow daemon`: the long-running uploader behind `narflow hook`.
use super::CliError;
use super::push::UploadArgs;
use narflow::cache;
use narflow::daemon::{DEFAULT_BATCH, Daemon, DaemonConfig, DaemonError};
use narflow::format::store_path::DEFAULT_STORE_DIR;
use narflow::hook::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use narflow::store::LocalStore;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub upload: UploadArgs,
    /// The Unix socket to listen on (created 0600, or 0660 with --socket-group).
    #[arg(long, env = "NARFLOW_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where the queue and the hook's spool live.
    #[arg(long, env = "NARFLOW_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Let this group (name or number) use the socket too.
    #[arg(long, env = "NARFLOW_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Seconds a shutdown may take: the batch in flight gets half of it to finish, then
    /// is cancelled (what is unfinished stays queued).
    #[arg(long, default_value_t = 60)]
    pub shutdown_timeout: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, env = "NARFLOW_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Most paths taken from the queue per upload batch.
    #[arg(long, default_value_t = DEFAULT_BATCH, hide = true)]
    pub batch: usize,
}

pub fn run(args: DaemonArgs) -> Result<u8, CliError> {
    let (url, opts) = args.upload.resolve()?;
    let open_opts = opts.cache_options(cache::S3Tuning::from_url(&url).map_err(CliError::usage)?);
    let socket_group = args
        .socket_group
        .as_deref()
        .map(group_id)
        .transpose()
        .map_err(|e| CliError::usage(anyhow::anyhow!(e)))?;
    let cfg = DaemonConfig {
        socket: args.socket.clone(),
        state_dir: args.state_dir,
        socket_group,
        opts,
        batch: args.batch,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        metrics_listen: args.metrics_listen,
    };
    let daemon = Daemon::bind(cfg).map_err(CliError::usage)?;
    let cache = match cache::open(&url, &open_opts) {
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

/// A group's id, from a number or a name in /etc/group.
fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("--socket-group {name}: cannot read /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(n, _)| *n == name)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("--socket-group {name}: no such group in /etc/group"))
}
