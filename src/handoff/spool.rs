//! The hook's spool: when the daemon cannot be reached, `narflow hook` appends its request
//! line to `<state dir>/spool`, and the daemon drains the file into its queue.
//!
//! No runtime (the hook links it): std and plain system calls. Appends and drains exclude
//! each other with an `flock` on `spool.lock`, waited for at most a bounded time:
//! - the hook takes the lock, appends one record to `spool` (O_APPEND), fsyncs it (and
//!   the directory when it created the file), and lets go;
//! - the daemon takes the lock only to rename `spool` to `spool.draining`; no hook can
//!   have that file open then. It reads it, queues what it names, and only after that
//!   commit removes it. A crash in between leaves `spool.draining`, which the next drain
//!   reads again: queueing a path twice is harmless.
//!
//! Records are framed so that one torn record (ENOSPC, or a hook killed mid-append) never
//! damages another: each is one line, `<checksum> <request line>`, where the checksum is
//! the first 4 bytes of the SHA-256 of the request line, in hex; and an append first ends
//! a torn last record with a newline, so every record starts on a fresh line. A line
//! whose checksum does not match is skipped; a line without a checksum is read as it is.
//!
//! Every file here is opened with `O_NOFOLLOW`, and the spool must be a regular file with
//! one link: root's hook never writes through a planted symlink or hard link.
//!
//! It never truncates a file it did not finish reading.
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file the hook appends to.
pub const SPOOL: &str = "spool";
/// The file a drain works on.
pub const DRAINING: &str = "spool.draining";
/// The lock that orders appends and the drain's rename.
pub const LOCK: &str = "spool.lock";

/// Longest wait for the spool lock. A holder keeps it for one append and fsync, or one
/// rename (milliseconds); one that holds it for a second is stuck or hostile, and the
/// build must not wait for it.
pub const LOCK_WAIT: Duration = Duration::from_secs(1);
/// How often a waiter tries the lock again (flock has no timed wait).
const LOCK_POLL: Duration = Duration::from_millis(5);

/// `O_NOFOLLOW`, for `OpenOptions::custom_flags`.
fn no_follow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Opens (creating) the lock file. Read-only when it exists: `flock` needs no write
/// access, and the daemon may run as another user than the hook.
fn open_lock(state_dir: &Path) -> io::Result<File> {
    let path = state_dir.join(LOCK);
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(&path);
    match opened {
        Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(no_follow())
            .open(&path),
        r => r,
    }
    .map_err(|e| named(&path, e))
}

/// Takes the lock on `lock`, waiting at most `wait`.
fn lock_within(lock: &File, wait: Duration) -> io::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(LOCK_POLL);
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{LOCK} is held by another process for more than {wait:?}"),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// `e` with the file it is about (symlink refusals say ELOOP, which names nothing).
fn named(path: &Path, e: io::Error) -> io::Error {
    let why = if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        "is a symbolic link (refused)".to_owned()
    } else {
        e.to_string()
    };
    io::Error::new(e.kind(), format!("{}: {why}", path.display()))
}

/// One spool record for `line` (a request line, newline included).
pub fn frame(line: &str) -> String {
    debug_assert!(line.ends_with('\n'));
    format!("{} {line}", checksum(line))
}

fn checksum(line: &str) -> String {
    let d = Sha256::digest(line.as_bytes());
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The request line a spool line carries, or `None` when the line is torn or damaged.
fn unframe(line: &str) -> Option<&str> {
    match line.split_once(' ') {
        Some((sum, rest)) if sum.len() == 8 && sum.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (checksum(rest) == sum).then_some(rest)
        }
        // An unframed line from an older hook: a request starts with its verb.
        _ if line.starts_with("ENQUEUE ") => Some(line),
        _ => None,
    }
}

/// Appends `line` (one request line, newline included) to the spool in `state_dir`,
/// durably: when this returns `Ok`, the record survives a crash. Waits at most
/// `lock_wait` for the spool lock.
///
/// # Errors
/// The I/O error, naming the file, for the caller to report (the hook has nothing
/// further to fall back on). A partial append is undone before the error is returned.
pub fn append(state_dir: &Path, line: &str, lock_wait: Duration) -> io::Result<PathBuf> {
    debug_assert!(line.ends_with('\n'));
    // The daemon may never have run yet: the spool waits for it all the same. 0700, as
    // the daemon wants its state directory.
    if !state_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)?;
        if let Some(parent) = state_dir.parent() {
            File::open(parent)?.sync_all()?;
        }
    }
    let lock = open_lock(state_dir)?;
    lock_within(&lock, lock_wait)?;
    let path = state_dir.join(SPOOL);
    let created = std::fs::symlink_metadata(&path).is_err();
    // 0644: the daemon may run as another user than the hook (root); store paths are not
    // secret.
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(no_follow())
        .open(&path)
        .map_err(|e| named(&path, e))?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() || meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{}: not a regular file with one link (refused)",
            path.display()
        )));
    }
    let len = meta.len();
    let mut record = String::with_capacity(line.len() + 10);
    if len > 0 {
        let mut last = [0u8; 1];
        file.read_exact_at(&mut last, len - 1)?;
        if last[0] != b'\n' {
            // A torn record: end it, so ours starts on a line of its own.
            record.push('\n');
        }
    }
    record.push_str(&frame(line));
    if let Err(e) = file.write_all(record.as_bytes()) {
        // E.g. ENOSPC: take back what went in, so no torn record is left.
        let _ = file.set_len(len);
        return Err(named(&path, e));
    }
    file.sync_data().map_err(|e| named(&path, e))?;
    if created {
        File::open(state_dir)?.sync_all()?;
    }
    Ok(path)
}

/// A spool file taken for draining. Call [`Taken::done`] after the lines are queued.
#[derive(Debug)]
pub struct Taken {
    path: PathBuf,
    /// The request lines of its intact records (newline included).
    pub lines: Vec<String>,
    /// Bytes of torn or damaged records, skipped.
    pub skipped_bytes: usize,
}

impl Taken {
    /// Removes the drained file (and makes the removal durable).
    ///
    /// # Errors
    /// The I/O error; the file is then drained again later (harmless).
    pub fn done(self) -> io::Result<()> {
        std::fs::remove_file(&self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Takes the spool in `state_dir` for draining: a leftover `spool.draining` first (a drain
/// that did not finish), else `spool`. `None` when there is nothing to drain. Waits at
/// most [`LOCK_WAIT`] for the lock.
///
/// # Errors
/// The I/O error (e.g. the state directory is unreadable, or the lock is held too long).
pub fn take(state_dir: &Path) -> io::Result<Option<Taken>> {
    let draining = state_dir.join(DRAINING);
    if std::fs::symlink_metadata(&draining).is_err() {
        if std::fs::symlink_metadata(state_dir.join(SPOOL)).is_err() {
            return Ok(None);
        }
        let lock = open_lock(state_dir)?;
        lock_within(&lock, LOCK_WAIT)?;
        match std::fs::rename(state_dir.join(SPOOL), &draining) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        File::open(state_dir)?.sync_all()?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(&draining)
        .map_err(|e| named(&draining, e))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let mut lines = Vec::new();
    let mut skipped_bytes = 0;
    for chunk in bytes.split_inclusive(|&b| b == b'\n') {
        let line = match (chunk.last(), std::str::from_utf8(chunk)) {
            (Some(b'\n'), Ok(line)) => unframe(line),
            _ => None,
        };
        match line {
            Some(l) => lines.push(l.to_owned()),
            None => skipped_bytes += chunk.len(),
        }
    }
    Ok(Some(Taken {
        path: draining,
        lines,
        skipped_bytes,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = LOCK_WAIT;

    #[test]
    fn appended_lines_are_drained_once_and_survive_an_unfinished_drain() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take(dir.path()).unwrap().is_none());
        append(dir.path(), "ENQUEUE - /nix/store/a\n", W).unwrap();
        append(dir.path(), "ENQUEUE - /nix/store/b\n", W).unwrap();
        let t = take(dir.path()).unwrap().unwrap();
        assert_eq!(t.lines.len(), 2);
        // A hand-off during the drain goes to a new spool file, not lost.
        append(dir.path(), "ENQUEUE - /nix/store/c\n", W).unwrap();
        // The drain "crashed": not done. The next take reads the same file again.
        drop(t);
        let t = take(dir.path()).unwrap().unwrap();
        assert_eq!(
            t.lines,
            ["ENQUEUE - /nix/store/a\n", "ENQUEUE - /nix/store/b\n"]
        );
        t.done().unwrap();
        let t = take(dir.path()).unwrap().unwrap();
        assert_eq!(t.lines, ["ENQUEUE - /nix/store/c\n"]);
        t.done().unwrap();
        assert!(take(dir.path()).unwrap().is_none());
    }

    #[test]
    fn a_missing_state_directory_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("not/yet");
        append(&state, "ENQUEUE - /nix/store/a\n", W).unwrap();
        let mode = std::fs::metadata(&state).unwrap().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        assert_eq!(
            take(&state).unwrap().unwrap().lines,
            ["ENQUEUE - /nix/store/a\n"]
        );
    }

    #[test]
    fn a_torn_record_damages_no_other_record() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), "ENQUEUE - /nix/store/a\n", W).unwrap();
        // A hook killed (or out of space) mid-append: half a record, no newline.
        let torn = frame("ENQUEUE - /nix/store/torn\n");
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(SPOOL))
            .unwrap();
        f.write_all(&torn.as_bytes()[..20]).unwrap();
        drop(f);
        // The next hand-off is intact, and so is everything before the torn record.
        append(dir.path(), "ENQUEUE - /nix/store/b\n", W).unwrap();
        let t = take(dir.path()).unwrap().unwrap();
        assert_eq!(
            t.lines,
            ["ENQUEUE - /nix/store/a\n", "ENQUEUE - /nix/store/b\n"]
        );
        assert_eq!(t.skipped_bytes, 21);
    }

    #[test]
    fn damaged_and_unframed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let good = frame("ENQUEUE - /nix/store/a\n");
        let bad = frame("ENQUEUE - /nix/store/b\n").replace("/b", "/c");
        std::fs::write(
            dir.path().join(SPOOL),
            format!("{good}{bad}ENQUEUE - /nix/store/old\nENQUEUE - /nix/st"),
        )
        .unwrap();
        let t = take(dir.path()).unwrap().unwrap();
        assert_eq!(
            t.lines,
            ["ENQUEUE - /nix/store/a\n", "ENQUEUE - /nix/store/old\n"]
        );
        assert_eq!(t.skipped_bytes, bad.len() + 17);
    }

    #[test]
    fn planted_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "precious\n").unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        // A symlinked spool: refused, the target untouched.
        std::os::unix::fs::symlink(&target, state.join(SPOOL)).unwrap();
        let e = append(&state, "ENQUEUE - /nix/store/a\n", W).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::fs::remove_file(state.join(SPOOL)).unwrap();
        // A hard-linked spool: refused too.
        std::fs::hard_link(&target, state.join(SPOOL)).unwrap();
        let e = append(&state, "ENQUEUE - /nix/store/a\n", W).unwrap_err();
        assert!(e.to_string().contains("one link"), "{e}");
        std::fs::remove_file(state.join(SPOOL)).unwrap();
        // A symlinked lock file.
        std::fs::remove_file(state.join(LOCK)).unwrap();
        std::os::unix::fs::symlink(&target, state.join(LOCK)).unwrap();
        let e = append(&state, "ENQUEUE - /nix/store/a\n", W).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        // The drain does not follow a planted spool.draining either.
        std::os::unix::fs::symlink(&target, state.join(DRAINING)).unwrap();
        assert!(take(&state).is_err());
    }

    #[test]
    fn a_held_lock_is_waited_for_a_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), "ENQUEUE - /nix/store/a\n", W).unwrap();
        let holder = open_lock(dir.path()).unwrap();
        holder.lock().unwrap();
        let wait = Duration::from_millis(100);
        let (tx, rx) = std::sync::mpsc::channel();
        let d = dir.path().to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(append(&d, "ENQUEUE - /nix/store/b\n", wait));
        });
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("append waits for the lock without bound");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        drop(holder);
        assert_eq!(take(dir.path()).unwrap().unwrap().lines.len(), 1);
    }

    #[test]
    fn concurrent_appends_and_drains_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let d = dir.path().to_owned();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        append(&d, &format!("ENQUEUE - /nix/store/{w}-{i}\n"), W * 10).unwrap();
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        let mut finished = false;
        while !finished {
            finished = writers.iter().all(|w| w.is_finished());
            // Four writers can keep the lock busy past the drain's bounded wait on a loaded
            // machine; the daemon then drains on its next tick, and so does this loop.
            let taken = match take(dir.path()) {
                Err(e) if e.kind() == io::ErrorKind::TimedOut && !finished => continue,
                r => r.unwrap(),
            };
            if let Some(t) = taken {
                seen.extend(t.lines.iter().cloned());
                t.done().unwrap();
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        while let Some(t) = take(dir.path()).unwrap() {
            seen.extend(t.lines.iter().cloned());
            t.done().unwrap();
        }
        seen.sort();
        let before = seen.len();
        seen.dedup();
        assert_eq!(before, seen.len(), "a line was drained twice");
        assert_eq!(seen.len(), 800);
    }
}
