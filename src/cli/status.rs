//! `narflow status`: what the daemon is doing, from its socket; from its queue file when
//! the daemon is not running.
use super::{CliError, exit};
use narflow::daemon::{Status, queue::Queue, queue::RetryClass, status_from_queue};
use narflow::handoff::hook::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use narflow::handoff::protocol::{Request, exchange};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's socket.
    #[arg(long, env = "NARFLOW_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The daemon's state directory (read when the daemon is not running).
    #[arg(long, env = "NARFLOW_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Exit code 0: nothing failing; 1: some paths are failing (retried with backoff, or
/// needing attention); 2: neither the daemon nor its queue could be read, or the daemon's
/// status cannot be read (another version of narflow: the field is named).
pub fn run(args: StatusArgs) -> Result<u8, CliError> {
    let status = match ask(&args.socket) {
        Ok(s) => s,
        Err(Ask::Unreadable(why)) => {
            return Err(CliError::usage(anyhow::anyhow!(
                "the daemon at {} answered a status this narflow cannot read: {why}",
                args.socket.display()
            )));
        }
        Err(Ask::NoAnswer(why)) => {
            let queue_err = |e: narflow::daemon::queue::QueueError| {
                CliError::usage(anyhow::anyhow!(
                    "the daemon at {} does not answer ({why}), and its queue cannot be read: {e}",
                    args.socket.display()
                ))
            };
            let q = Queue::open_read_only(&args.state_dir).map_err(queue_err)?;
            let mut s = status_from_queue(&q).map_err(queue_err)?;
            s.daemon_error = Some(why);
            s
        }
    };
    if args.json {
        println!("{}", status.to_json());
    } else {
        print_human(&status, &args.socket);
    }
    Ok(if status.failing > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    })
}

/// Why the daemon's status was not had.
enum Ask {
    /// No daemon answered (or it answered an error): the queue file is read instead.
    NoAnswer(String),
    /// A daemon answered with a status that cannot be read.
    Unreadable(String),
}

fn ask(socket: &Path) -> Result<Status, Ask> {
    let reply = exchange(socket, &Request::Status.to_line(), Duration::from_secs(10))
        .map_err(|e| Ask::NoAnswer(e.to_string()))?;
    match reply.strip_prefix("OK ") {
        Some(json) => {
            Status::from_json(json.trim_end()).map_err(|e| Ask::Unreadable(e.to_string()))
        }
        None => Err(Ask::NoAnswer(format!("it answered {:?}", reply.trim_end()))),
    }
}

fn print_human(s: &Status, socket: &Path) {
    match (s.daemon, s.uptime_seconds, s.in_flight) {
        (true, Some(up), Some(in_flight)) => println!(
            "daemon: running on {} (up {up} s), {in_flight} paths in flight",
            socket.display(),
        ),
        _ => println!(
            "daemon: not running ({})",
            s.daemon_error.as_deref().unwrap_or("?")
        ),
    }
    println!(
        "queue: {} pending ({} failing, {} needing attention), {} done, {} dropped (finished paths are kept 7 days)",
        s.pending, s.failing, s.needs_attention, s.done, s.dropped
    );
    if let (Some(r), Some(since)) = (&s.recent, &s.since_start) {
        println!(
            "recent: {:.1} paths/s, {:.1} MB/s of NAR over the last {} s; {} uploaded since start",
            r.uploaded_per_second, r.nar_mb_per_second, r.window_seconds, since.uploaded
        );
    }
    if let Some(b) = &s.last_batch {
        println!(
            "last batch: {} paths asked, {} uploaded, {} already in the cache, {} failed, {} dropped, in {:.2} s, {} s ago",
            b.paths, b.uploaded, b.already_present, b.failed, b.dropped, b.seconds, b.seconds_ago
        );
    }
    for u in s.large_uploads.iter().flatten() {
        let eta = u
            .eta_seconds
            .map_or_else(|| "?".to_owned(), |e| format!("{e:.0} s"));
        let resumed = if u.bytes_resumed > 0 {
            format!(
                "; {} resumed after a restart",
                narflow::settings::format_size(u.bytes_resumed)
            )
        } else {
            String::new()
        };
        println!(
            "uploading: {} part {}/{}, {} of {}, {:.1} MB/s, ETA {eta}{resumed}",
            u.store_path.as_deref().unwrap_or("(not a NAR)"),
            u.parts_done,
            u.parts_total,
            narflow::settings::format_size(u.bytes_done),
            narflow::settings::format_size(u.bytes_total),
            u.bytes_per_second / 1e6,
        );
    }
    match (&s.watch, s.daemon) {
        (Some(w), _) => println!(
            "watch-store: {}, at Nix database row {}{}",
            w.mode.map_or("(not running)", |m| m.as_str()),
            w.cursor,
            w.queued_since_start
                .map(|n| format!("; {n} paths queued since start"))
                .unwrap_or_default()
        ),
        (None, true) => println!("watch-store: off"),
        (None, false) => {}
    }
    let now = narflow::daemon::queue::now_ms();
    for f in &s.failures {
        let next = (f.next_attempt_ms - now).max(0) / 1000;
        // A failure retrying cannot fix (corrupt store path, access denied, missing
        // bucket) is retried slowly; someone must act.
        let label = if f.needs_attention {
            "needs attention"
        } else {
            "failing"
        };
        let retry = match f.retry {
            RetryClass::Transient => "retrying may help",
            RetryClass::Permanent => "retrying cannot help",
        };
        println!(
            "{label}: {} ({} attempts, next in {next} s; {} error, {retry}): {}",
            f.path, f.attempts, f.kind, f.last_error
        );
    }
    for d in &s.dropped_paths {
        println!("dropped: {}: {}", d.path, d.why);
    }
}
