//! Fault injection for a `file://` cache's file operations ([`super::file::FsHook`]), with
//! a model of what a crash would leave.
//!
//! [`FaultPlan`] fails the operations a test chooses (the k-th of all, or those matching a
//! rule) with a chosen error, and keeps what is durable: bytes written since their file's
//! last successful `fdatasync` or `syncfs` are not, a file whose sync failed never is
//! (Linux may have dropped its dirty pages and marked them clean), and a rename is not
//! until its directory's fsync succeeds. At the moment any narinfo is about to get its
//! final name it checks Nix's invariant against that model: the narinfo's own bytes, its
//! NAR under its final name at FileSize and each reference's narinfo must all be durable.
//! Nothing else can make a narinfo visible, so this is every moment a reader could look.
use super::file::{FsHook, FsOp};
use crate::format::narinfo::NarInfo;
use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Which operations fail.
#[derive(Debug, Clone, Copy)]
pub enum Fail {
    Never,
    /// The operation numbered `k` (from 0) of all that reach the plan.
    Nth(usize),
    /// The first `times` operations that `matches` accepts.
    Matching {
        matches: fn(FsOp<'_>) -> bool,
        times: usize,
    },
}

/// The error an injected fault returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    /// `ENOSPC`: the file system is full.
    NoSpace,
    /// `EIO`: the device failed the request.
    Io,
}

impl Errno {
    pub fn error(self) -> io::Error {
        let e = match self {
            Errno::NoSpace => rustix::io::Errno::NOSPC,
            Errno::Io => rustix::io::Errno::IO,
        };
        io::Error::from_raw_os_error(e.raw_os_error())
    }
}

#[derive(Debug, Default)]
struct Model {
    /// Files with bytes written since their last successful sync.
    dirty: HashSet<PathBuf>,
    /// Files whose sync failed: never durable, whatever later syncs say.
    lost: HashSet<PathBuf>,
    /// Names given by a rename whose directory has not been fsynced since (a rename over
    /// a durable name leaves it durable: a crash leaves the old file or the new).
    unsynced_names: HashSet<PathBuf>,
    /// Targets of renames under way that replace a name already there.
    replacing: HashSet<PathBuf>,
}

impl Model {
    fn durable(&self, p: &Path) -> bool {
        !self.dirty.contains(p) && !self.lost.contains(p) && !self.unsynced_names.contains(p)
    }
}

/// A [`FsHook`] that injects faults and checks the closure invariant at every narinfo
/// rename against the durability model.
#[derive(Debug)]
pub struct FaultPlan {
    root: PathBuf,
    store_dir: String,
    fail: Mutex<Fail>,
    errno: Errno,
    ops: AtomicUsize,
    /// The operations that were failed, and a signal for each.
    fired: Mutex<Vec<String>>,
    fired_cv: std::sync::Condvar,
    /// Syncs done (whether they succeeded or not), signalled on `fired_cv` too.
    syncs: AtomicUsize,
    violations: Mutex<Vec<String>>,
    model: Mutex<Model>,
}

fn device(p: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = if p.is_dir() { p } else { p.parent()? };
    std::fs::metadata(dir).ok().map(|m| m.dev())
}

impl FaultPlan {
    /// A plan for the cache at `root` holding paths of `store_dir`.
    pub fn new(root: &Path, store_dir: &str, fail: Fail, errno: Errno) -> Self {
        FaultPlan {
            root: root.to_owned(),
            store_dir: store_dir.to_owned(),
            fail: Mutex::new(fail),
            errno,
            ops: AtomicUsize::new(0),
            fired: Mutex::default(),
            fired_cv: std::sync::Condvar::new(),
            syncs: AtomicUsize::new(0),
            violations: Mutex::default(),
            model: Mutex::default(),
        }
    }

    /// Operations seen so far.
    pub fn ops(&self) -> usize {
        self.ops.load(Ordering::SeqCst)
    }

    /// The operations that were failed, described.
    pub fn fired(&self) -> Vec<String> {
        self.fired.lock().unwrap().clone()
    }

    /// Waits until `n` faults have fired, at most `timeout`; returns whether they did.
    pub fn wait_fired(&self, n: usize, timeout: std::time::Duration) -> bool {
        let fired = self.fired.lock().unwrap();
        let (fired, _) = self
            .fired_cv
            .wait_timeout_while(fired, timeout, |f| f.len() < n)
            .unwrap();
        fired.len() >= n
    }

    /// Waits until a sync has run (or failed) or a fault has fired, at most `timeout`;
    /// returns whether one did.
    pub fn wait_sync_or_fault(&self, timeout: std::time::Duration) -> bool {
        let fired = self.fired.lock().unwrap();
        let (fired, _) = self
            .fired_cv
            .wait_timeout_while(fired, timeout, |f| {
                f.is_empty() && self.syncs.load(Ordering::SeqCst) == 0
            })
            .unwrap();
        !fired.is_empty() || self.syncs.load(Ordering::SeqCst) > 0
    }

    /// Every moment the invariant did not hold, described.
    pub fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }

    /// No more faults from now on: what a disk that has space again looks like.
    pub fn heal(&self) {
        *self.fail.lock().unwrap() = Fail::Never;
    }

    fn should_fail(&self, n: usize, op: FsOp<'_>) -> bool {
        let mut fail = self.fail.lock().unwrap();
        match &mut *fail {
            Fail::Never => false,
            Fail::Nth(k) => *k == n,
            Fail::Matching { matches, times } => {
                if *times > 0 && matches(op) {
                    *times -= 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Nix's invariant for the narinfo about to be named `to` from the temporary `from`.
    fn check_narinfo(&self, from: &Path, to: &Path, model: &Model) -> Result<(), String> {
        let name = to.display();
        if !model.durable(from) {
            return Err(format!("{name}: its own bytes are not durable"));
        }
        let text = std::fs::read_to_string(from).map_err(|e| format!("{name}: {e}"))?;
        let n = NarInfo::parse(&text, &self.store_dir).map_err(|e| format!("{name}: {e}"))?;
        let nar = self.root.join(&n.url);
        let size = std::fs::metadata(&nar).ok().map(|m| m.len());
        if size.is_none() || size != n.file_size {
            return Err(format!(
                "{name}: its NAR {} is {size:?} bytes, not {:?}",
                n.url, n.file_size
            ));
        }
        if !model.durable(&nar) {
            return Err(format!("{name}: its NAR {} is not durable", n.url));
        }
        for r in n.references.iter().filter(|r| **r != n.store_path) {
            let at = self.root.join(super::narinfo_key(r));
            if !at.exists() || !model.durable(&at) {
                return Err(format!("{name}: its reference {r} has no durable narinfo"));
            }
        }
        Ok(())
    }
}

impl FsHook for FaultPlan {
    fn before(&self, op: FsOp<'_>) -> io::Result<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if self.should_fail(n, op) {
            self.fired.lock().unwrap().push(format!("#{n} {op:?}"));
            self.fired_cv.notify_all();
            return Err(self.errno.error());
        }
        if let FsOp::Rename { from, to } = op {
            let mut model = self.model.lock().unwrap();
            if to.extension().is_some_and(|e| e == "narinfo")
                && let Err(why) = self.check_narinfo(from, to, &model)
            {
                self.violations.lock().unwrap().push(why);
            }
            if to.exists() && !model.unsynced_names.contains(to) {
                model.replacing.insert(to.to_owned());
            }
        }
        Ok(())
    }

    fn after(&self, op: FsOp<'_>, ok: bool) {
        if matches!(op, FsOp::SyncData(_) | FsOp::SyncFs(_)) {
            // Counted under the lock the waiters check it under, so no signal is missed.
            let _fired = self.fired.lock().unwrap();
            self.syncs.fetch_add(1, Ordering::SeqCst);
            self.fired_cv.notify_all();
        }
        let mut m = self.model.lock().unwrap();
        match op {
            // A failed write may have written part of its bytes.
            FsOp::Write(p) => {
                m.dirty.insert(p.to_owned());
            }
            FsOp::SyncData(p) if ok => {
                m.dirty.remove(p);
            }
            FsOp::SyncData(p) => {
                m.lost.insert(p.to_owned());
            }
            FsOp::SyncFs(d) => {
                let dev = device(d);
                let on_it: Vec<PathBuf> = m
                    .dirty
                    .iter()
                    .filter(|p| device(p) == dev)
                    .cloned()
                    .collect();
                for p in on_it {
                    m.dirty.remove(&p);
                    if !ok {
                        m.lost.insert(p);
                    }
                }
            }
            FsOp::Rename { from, to } if ok => {
                let (dirty, lost) = (m.dirty.remove(from), m.lost.remove(from));
                // What the name held before is replaced.
                m.dirty.remove(to);
                m.lost.remove(to);
                if dirty {
                    m.dirty.insert(to.to_owned());
                }
                if lost {
                    m.lost.insert(to.to_owned());
                }
                if !m.replacing.remove(to) {
                    m.unsynced_names.insert(to.to_owned());
                }
            }
            FsOp::Rename { to, .. } => {
                m.replacing.remove(to);
            }
            FsOp::SyncDir(d) if ok => {
                m.unsynced_names.retain(|n| n.parent() != Some(d));
            }
            _ => {}
        }
    }
}
