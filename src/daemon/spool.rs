//! The hook's spool: when the daemon cannot be reached, `narflow hook` appends its request
//! line to `<state dir>/spool`, and the daemon drains the file into its queue.
//!
//! std only (the hook links it). Appends and drains exclude each other with an `flock` on
//! `spool.lock`:
//! - the hook takes the lock, appends one line to `spool` (O_APPEND), fsyncs it (and the
//!   directory when it created the file), and lets go;
//! - the daemon takes the lock only to rename `spool` to `spool.draining`; no hook can
//!   have that file open then. It reads it, queues what it names, and only after that
//!   commit removes it. A crash in between leaves `spool.draining`, which the next drain
//!   reads again: queueing a path twice is harmless.
//!
//! It never truncates a file it did not finish reading.
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The file the hook appends to.
pub const SPOOL: &str = "spool";
/// The file a drain works on.
pub const DRAINING: &str = "spool.draining";
/// The lock that orders appends and the drain's rename.
pub const LOCK: &str = "spool.lock";

/// Opens (creating) the lock file. Read-only when it exists: `flock` needs no write
/// access, and the daemon may run as another user than the hook.
fn open_lock(state_dir: &Path) -> io::Result<File> {
    let path = state_dir.join(LOCK);
    match File::open(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path),
        r => r,
    }
}

/// Appends `line` (one request line, newline included) to the spool in `state_dir`,
/// durably: when this returns `Ok`, the line survives a crash.
///
/// # Errors
/// The I/O error, for the caller to report (the hook has nothing further to fall back on).
pub fn append(state_dir: &Path, line: &str) -> io::Result<PathBuf> {
    debug_assert!(line.ends_with('\n'));
    // The daemon may never have run yet: the spool waits for it all the same.
    if !state_dir.exists() {
        std::fs::create_dir_all(state_dir)?;
        if let Some(parent) = state_dir.parent() {
            File::open(parent)?.sync_all()?;
        }
    }
    let lock = open_lock(state_dir)?;
    lock.lock()?;
    let path = state_dir.join(SPOOL);
    let created = !path.exists();
    // 0644: the daemon may run as another user than the hook (root); store paths are not
    // secret.
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(&path)?;
    file.write_all(line.as_bytes())?;
    file.sync_data()?;
    if created {
        File::open(state_dir)?.sync_all()?;
    }
    Ok(path)
}

/// A spool file taken for draining. Call [`Taken::done`] after the lines are queued.
#[derive(Debug)]
pub struct Taken {
    path: PathBuf,
    /// Its complete lines (a torn last line, from a hook killed mid-write, is left out).
    pub lines: Vec<String>,
    /// Bytes that were not valid UTF-8 or not newline-terminated, skipped.
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
/// that did not finish), else `spool`. `None` when there is nothing to drain.
///
/// # Errors
/// The I/O error (e.g. the state directory is unreadable).
pub fn take(state_dir: &Path) -> io::Result<Option<Taken>> {
    let draining = state_dir.join(DRAINING);
    if !draining.exists() {
        if !state_dir.join(SPOOL).exists() {
            return Ok(None);
        }
        let lock = open_lock(state_dir)?;
        lock.lock()?;
        match std::fs::rename(state_dir.join(SPOOL), &draining) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        File::open(state_dir)?.sync_all()?;
    }
    let mut file = File::open(&draining)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let mut lines = Vec::new();
    let mut skipped_bytes = 0;
    for chunk in bytes.split_inclusive(|&b| b == b'\n') {
        match (chunk.last(), std::str::from_utf8(chunk)) {
            (Some(b'\n'), Ok(line)) => lines.push(line.to_owned()),
            _ => skipped_bytes += chunk.len(),
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

    #[test]
    fn appended_lines_are_drained_once_and_survive_an_unfinished_drain() {
        let dir = tempfile::tempdir().unwrap();
        assert!(take(dir.path()).unwrap().is_none());
        append(dir.path(), "ENQUEUE - /nix/store/a\n").unwrap();
        append(dir.path(), "ENQUEUE - /nix/store/b\n").unwrap();
        let t = take(dir.path()).unwrap().unwrap();
        assert_eq!(t.lines.len(), 2);
        // A hand-off during the drain goes to a new spool file, not lost.
        append(dir.path(), "ENQUEUE - /nix/store/c\n").unwrap();
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
    fn a_missing_state_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("not/yet");
        append(&state, "ENQUEUE - /nix/store/a\n").unwrap();
        assert_eq!(
            take(&state).unwrap().unwrap().lines,
            ["ENQUEUE - /nix/store/a\n"]
        );
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(SPOOL),
            b"ENQUEUE - /nix/store/a\nENQUEUE - /nix/st",
        )
        .unwrap();
        let t = take(dir.path()).unwrap().unwrap();
        assert_eq!(t.lines, ["ENQUEUE - /nix/store/a\n"]);
        assert_eq!(t.skipped_bytes, 17);
    }

    #[test]
    fn concurrent_appends_and_drains_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let d = dir.path().to_owned();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        append(&d, &format!("ENQUEUE - /nix/store/{w}-{i}\n")).unwrap();
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        let mut finished = false;
        while !finished {
            finished = writers.iter().all(|w| w.is_finished());
            if let Some(t) = take(dir.path()).unwrap() {
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
