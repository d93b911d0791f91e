//! `narflow status`: what the daemon is doing, from its socket; from its queue file when
//! the daemon is not running.
use super::{CliError, exit};
use narflow::daemon::protocol::{Request, exchange};
use narflow::daemon::{queue::Queue, status_from_queue};
use narflow::hook::{DEFAULT_SOCKET, DEFAULT_STATE_DIR};
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
/// needing attention); 2: neither the daemon nor its queue could be read.
pub fn run(args: StatusArgs) -> Result<u8, CliError> {
    let status = match ask(&args.socket) {
        Ok(v) => v,
        Err(why) => {
            let q = Queue::open_read_only(&args.state_dir).map_err(|e| {
                CliError::usage(anyhow::anyhow!(
                    "the daemon at {} does not answer ({why}), and its queue cannot be read: {e}",
                    args.socket.display()
                ))
            })?;
            let mut v = status_from_queue(&q);
            v["daemon"] = serde_json::json!(false);
            v["daemon_error"] = serde_json::json!(why);
            v
        }
    };
    if let Some(e) = status.get("error") {
        return Err(CliError::usage(anyhow::anyhow!("queue: {e}")));
    }
    if args.json {
        println!("{status}");
    } else {
        print_human(&status, &args.socket);
    }
    let failing = status["failing"].as_u64().unwrap_or(0);
    Ok(if failing > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    })
}

fn ask(socket: &Path) -> Result<serde_json::Value, String> {
    let reply = exchange(socket, &Request::Status.to_line(), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    match reply.strip_prefix("OK ") {
        Some(json) => serde_json::from_str(json.trim_end()).map_err(|e| e.to_string()),
        None => Err(format!("unexpected reply {:?}", reply.trim_end())),
    }
}

fn print_human(v: &serde_json::Value, socket: &Path) {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    if v["daemon"] == true {
        println!(
            "daemon: running on {} (up {} s), {} paths in flight",
            socket.display(),
            n("uptime_seconds"),
            n("in_flight")
        );
    } else {
        println!(
            "daemon: not running ({})",
            v["daemon_error"].as_str().unwrap_or("?")
        );
    }
    println!(
        "queue: {} pending ({} failing, {} needing attention), {} done, {} dropped (finished paths are kept 7 days)",
        n("pending"),
        n("failing"),
        n("needs_attention"),
        n("done"),
        n("dropped")
    );
    if let Some(r) = v.get("recent") {
        println!(
            "recent: {:.1} paths/s, {:.1} MB/s of NAR over the last {} s; {} uploaded since start",
            r["uploaded_per_second"].as_f64().unwrap_or(0.0),
            r["nar_mb_per_second"].as_f64().unwrap_or(0.0),
            r["window_seconds"],
            v["since_start"]["uploaded"]
        );
    }
    if let Some(b) = v.get("last_batch").filter(|b| !b.is_null()) {
        println!(
            "last batch: {} paths asked, {} uploaded, {} already in the cache, {} failed, {} dropped, in {:.2} s, {} s ago",
            b["paths"],
            b["uploaded"],
            b["already_present"],
            b["failed"],
            b["dropped"],
            b["seconds"].as_f64().unwrap_or(0.0),
            b["seconds_ago"]
        );
    }
    let now = narflow::daemon::queue::now_ms();
    for f in v["failures"].as_array().into_iter().flatten() {
        let next = (f["next_attempt_ms"].as_i64().unwrap_or(now) - now).max(0) / 1000;
        // A failure retrying cannot fix (corrupt store path, access denied, missing
        // bucket) is retried slowly; someone must act.
        let label = if f["needs_attention"] == true {
            "needs attention"
        } else {
            "failing"
        };
        println!(
            "{label}: {} ({} attempts, next in {next} s): {}",
            f["path"].as_str().unwrap_or("?"),
            f["attempts"],
            f["last_error"].as_str().unwrap_or("")
        );
    }
    for d in v["dropped_paths"].as_array().into_iter().flatten() {
        println!(
            "dropped: {}: {}",
            d["path"].as_str().unwrap_or("?"),
            d["why"].as_str().unwrap_or("")
        );
    }
}
