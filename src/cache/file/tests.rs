//! The `file://` cache: layout, durability, damage, locking, sweeps and its error paths
//! (through [`FaultPlan`]).
use super::*;

#[test]
fn the_listing_names_every_narinfo_and_nothing_else() {
    let (dir, c) = cache();
    assert_eq!(
        c.list_narinfos().unwrap(),
        Some(super::super::NarinfoSet::default())
    );
    let a = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-a").unwrap();
    let b = StorePath::from_base_name("9zfkprp7xigl4ny63bvmiva5p5sk290q-b").unwrap();
    c.put_narinfo(&a, &narinfo_text(&a, 1)).unwrap();
    c.put_narinfo(&b, &narinfo_text(&b, 1)).unwrap();
    c.ensure_cache_info("/nix/store").unwrap();
    // Not narinfos: a name that is no hash part, another object, a temporary file.
    std::fs::write(dir.path().join("not-a-hash.narinfo"), "x").unwrap();
    std::fs::write(dir.path().join(format!("{}.ls", a.hash_part())), "{}").unwrap();
    std::fs::write(dir.path().join(format!("{TEMP_PREFIX}x.narinfo")), "x").unwrap();
    let set = c.list_narinfos().unwrap().unwrap();
    let want: super::super::NarinfoSet = [&a, &b]
        .iter()
        .map(|p| crate::format::nix32::decode::<20>(p.hash_part().as_bytes()).unwrap())
        .collect();
    assert_eq!(set, want);
}

#[test]
fn the_object_listing_names_every_file_with_its_size_and_reads_them_back() {
    let (dir, c) = cache();
    // A new cache: `nar/` may exist or not; `log/` does not.
    let mut seen = Vec::new();
    assert!(
        c.list_objects(&mut |o| seen.push(o.key.to_owned()))
            .unwrap()
    );
    assert_eq!(seen, Vec::<String>::new());
    std::fs::create_dir_all(dir.path().join("nar/sub")).unwrap();
    std::fs::create_dir_all(dir.path().join("log")).unwrap();
    for (key, bytes) in [
        ("a.narinfo", &b"narinfo"[..]),
        ("nar/x.nar.zst", b"12345"),
        ("nar/sub/not-listed", b"x"),
        ("log/d.drv", b"log"),
    ] {
        std::fs::write(dir.path().join(key), bytes).unwrap();
    }
    let mut seen = Vec::new();
    assert!(
        c.list_objects(&mut |o| {
            assert!(o.modified.is_some(), "{}", o.key);
            seen.push((o.key.to_owned(), o.size));
        })
        .unwrap()
    );
    seen.sort();
    let want =
        [("a.narinfo", 7), ("log/d.drv", 3), ("nar/x.nar.zst", 5)].map(|(k, n)| (k.to_owned(), n));
    assert_eq!(seen, want);
    let keys = ["a.narinfo".to_owned(), "missing.narinfo".to_owned()];
    assert_eq!(
        c.get_texts(&keys).unwrap(),
        vec![Some("narinfo".to_owned()), None]
    );
}

fn cache() -> (tempfile::TempDir, FileCache) {
    let dir = tempfile::tempdir().unwrap();
    let c = FileCache::open(dir.path(), "file:///test").unwrap();
    (dir, c)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[test]
fn uncommitted_nar_leaves_nothing() {
    let (dir, c) = cache();
    let mut up = c.begin_nar(0).unwrap();
    up.write_all(b"partial").unwrap();
    drop(up);
    assert_eq!(listing(dir.path()), Vec::<String>::new());
}

#[test]
fn committed_nar_is_complete_and_readable() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, c) = cache();
    let mut up = c.begin_nar(0).unwrap();
    up.write_all(b"complete nar").unwrap();
    up.commit("nar/abc.nar.zst").unwrap();
    // Named only once a sync has made its bytes durable.
    assert!(!c.has_object("nar/abc.nar.zst").unwrap());
    c.sync().unwrap();
    assert_eq!(listing(dir.path()), vec!["nar/abc.nar.zst"]);
    let p = dir.path().join("nar/abc.nar.zst");
    assert_eq!(std::fs::read(&p).unwrap(), b"complete nar");
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_eq!(c.object_size("nar/abc.nar.zst").unwrap(), Some(12));
}

#[test]
fn cache_info_created_once_and_checked() {
    let (dir, c) = cache();
    c.ensure_cache_info("/nix/store").unwrap();
    let text = std::fs::read_to_string(dir.path().join("nix-cache-info")).unwrap();
    assert_eq!(
        text,
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
    );
    c.ensure_cache_info("/nix/store").unwrap();
    let e = c.ensure_cache_info("/other/store").unwrap_err().to_string();
    assert!(
        e.contains("the cache is for store /nix/store, not /other/store"),
        "{e}"
    );
}

/// A narinfo for `p` whose NAR is `nar/x.nar` of `size` bytes.
fn narinfo_text(p: &StorePath, size: u64) -> String {
    use crate::format::hash::Sha256;
    NarInfo {
        store_path: p.clone(),
        url: "nar/x.nar".into(),
        compression: "none".into(),
        file_hash: Some(Sha256::digest(b"x")),
        file_size: Some(size),
        nar_hash: Sha256::digest(b"x"),
        nar_size: size,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
    }
    .render("/nix/store")
}

#[test]
fn narinfo_written_under_hash_part_and_trusted_only_when_sound() {
    let (dir, c) = cache();
    let p = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-hi.txt").unwrap();
    let q = StorePath::from_base_name("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-other").unwrap();
    assert!(!c.has_narinfo(&p).unwrap());
    std::fs::write(dir.path().join("nar/x.nar"), b"0123456789").unwrap();
    c.put_narinfo(&p, &narinfo_text(&p, 10)).unwrap();
    assert!(c.has_narinfo(&p).unwrap());
    assert_eq!(
        listing(dir.path()),
        vec!["nar/x.nar", "qs2vcw1sd6lzsvgvq6gggnw1v31qrm28.narinfo"]
    );
    // Damaged ones, as a crash before writeback or another writer could leave them.
    for (text, why) in [
        (String::new(), "empty"),
        ("StorePath: x\n".into(), "does not parse"),
        (narinfo_text(&q, 10), "names another path"),
        (narinfo_text(&p, 11), "its NAR is shorter than FileSize"),
    ] {
        c.put_narinfo(&p, &text).unwrap();
        assert!(!c.has_narinfo(&p).unwrap(), "{why}: trusted");
    }
    std::fs::remove_file(dir.path().join("nar/x.nar")).unwrap();
    c.put_narinfo(&p, &narinfo_text(&p, 10)).unwrap();
    assert!(!c.has_narinfo(&p).unwrap(), "missing NAR: trusted");
}

use crate::cache::fault::{Errno, Fail, FaultPlan};

/// A cache at a new directory whose file operations go through a [`FaultPlan`].
fn faulty(fail: Fail) -> (tempfile::TempDir, FileCache, Arc<FaultPlan>) {
    let dir = tempfile::tempdir().unwrap();
    let plan = Arc::new(FaultPlan::new(
        dir.path(),
        "/nix/store",
        fail,
        Errno::NoSpace,
    ));
    let c = FileCache::open_with_hook(dir.path(), "file:///t", Some(plan.clone())).unwrap();
    (dir, c, plan)
}

/// A narinfo for `name` whose NAR, committed to `c`, holds `bytes`.
fn committed(c: &FileCache, name: &str, bytes: &[u8]) -> NarInfo {
    use crate::format::hash::Sha256;
    let hash = crate::format::nix32::encode(&Sha256::digest(name.as_bytes()).0[..20]);
    let url = format!("nar/{hash}.nar");
    let mut up = c.begin_nar(bytes.len() as u64).unwrap();
    up.write_all(bytes).unwrap();
    up.written();
    up.commit(&url).unwrap();
    NarInfo {
        store_path: StorePath::from_base_name(&format!("{hash}-{name}")).unwrap(),
        url,
        compression: "none".into(),
        file_hash: Some(Sha256::digest(bytes)),
        file_size: Some(bytes.len() as u64),
        nar_hash: Sha256::digest(bytes),
        nar_size: bytes.len() as u64,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
    }
}

fn is_narinfo_temp_write(op: FsOp<'_>) -> bool {
    matches!(op, FsOp::Write(p) if p.parent().and_then(Path::file_name) != Some("nar".as_ref()))
}

fn is_nar_sync(op: FsOp<'_>) -> bool {
    matches!(op, FsOp::SyncData(p) if p.parent().and_then(Path::file_name) == Some("nar".as_ref()))
}

#[test]
fn a_wave_that_fails_before_its_sync_keeps_the_nars_waiting_for_their_narinfos() {
    // P's NAR waits for P's narinfo (P's reference is slow); another path's wave hits
    // a full disk writing its narinfo. P's NAR is still P's, and goes up with it.
    let (dir, c, plan) = faulty(Fail::Matching {
        matches: is_narinfo_temp_write,
        times: 1,
    });
    let p = committed(&c, "p", b"the NAR of p");
    let w = committed(&c, "w", b"the NAR of w");
    let e = c
        .publish_narinfos("/nix/store", vec![w.clone()])
        .unwrap_err();
    assert!(e.is_transient(), "a full disk heals: {e}");
    assert_eq!(plan.fired().len(), 1);
    let published = c
        .publish_narinfos("/nix/store", vec![p.clone(), w])
        .unwrap();
    assert!(published.iter().all(|r| r.is_ok()), "{published:?}");
    assert_eq!(
        std::fs::read(dir.path().join(&p.url)).unwrap(),
        b"the NAR of p"
    );
    assert!(c.has_narinfo(&p.store_path).unwrap());
    assert_eq!(plan.violations(), Vec::<String>::new());
}

#[test]
fn a_failed_sync_loses_its_nars_and_their_narinfos_are_refused_not_published() {
    // The sync that covers P's NAR fails: its data may be gone (Linux marks the pages
    // clean), so P's NAR is discarded and P's narinfo, published later, is refused.
    let (dir, c, plan) = faulty(Fail::Matching {
        matches: is_nar_sync,
        times: 1,
    });
    let p = committed(&c, "p", b"the NAR of p");
    let w = committed(&c, "w", b"the NAR of w");
    let e = c.publish_narinfos("/nix/store", vec![w]).unwrap_err();
    assert!(e.is_transient(), "{e}");
    let published = c.publish_narinfos("/nix/store", vec![p.clone()]).unwrap();
    let err = published[0].as_ref().unwrap_err();
    assert!(err.is_transient(), "it goes up again: {err}");
    assert!(err.to_string().contains(&p.url), "{err}");
    assert!(
        !dir.path()
            .join(super::super::narinfo_key(&p.store_path))
            .exists()
    );
    assert_eq!(plan.violations(), Vec::<String>::new());
    // Uploaded again, it is published.
    let p = committed(&c, "p", b"the NAR of p");
    let published = c.publish_narinfos("/nix/store", vec![p.clone()]).unwrap();
    assert!(published[0].is_ok(), "{published:?}");
    assert!(c.has_narinfo(&p.store_path).unwrap());
    assert_eq!(plan.violations(), Vec::<String>::new());
}

#[test]
fn a_nar_that_cannot_be_renamed_fails_its_own_path_and_the_wave_goes_on() {
    let (dir, c, _plan) = faulty(Fail::Never);
    let p = committed(&c, "p", b"the NAR of p");
    let q = committed(&c, "q", b"the NAR of q");
    // Something that is not a file at P's NAR's final name (EISDIR on rename).
    std::fs::create_dir_all(dir.path().join(&p.url).join("x")).unwrap();
    let published = c
        .publish_narinfos("/nix/store", vec![p.clone(), q.clone()])
        .unwrap();
    assert!(published[0].is_err(), "{published:?}");
    assert!(published[1].is_ok(), "{published:?}");
    assert!(!c.has_narinfo(&p.store_path).unwrap());
    assert!(c.has_narinfo(&q.store_path).unwrap());
}

#[test]
fn a_sweep_never_removes_what_this_process_still_owns() {
    let (dir, c) = cache();
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    let age = |all: &mut dyn Iterator<Item = PathBuf>| {
        for p in all {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
    };
    // A NAR committed days ago, waiting for its narinfo, and one still being written.
    let mut up = c.begin_nar(3).unwrap();
    up.write_all(b"old").unwrap();
    up.written();
    up.commit("nar/waiting.nar").unwrap();
    let mut writing = c.begin_nar(3).unwrap();
    writing.write_all(b"slo").unwrap();
    writing.flush().unwrap();
    // And one a killed process left.
    std::fs::write(dir.path().join(format!("nar/{TEMP_PREFIX}dead")), b"x").unwrap();
    age(&mut walk(dir.path()).into_iter());
    assert_eq!(c.sweep_orphans(Duration::from_secs(86_400)).unwrap(), 1);
    writing.write_all(b"w").unwrap();
    writing.written();
    writing.commit("nar/slow.nar").unwrap();
    c.sync().unwrap();
    assert_eq!(listing(dir.path()), vec!["nar/slow.nar", "nar/waiting.nar"]);
    assert_eq!(
        std::fs::read(dir.path().join("nar/slow.nar")).unwrap(),
        b"slow"
    );
}

/// Records the file systems synced.
#[derive(Debug, Default)]
struct Synced(Mutex<Vec<PathBuf>>);
impl FsHook for Synced {
    fn before(&self, op: FsOp<'_>) -> io::Result<()> {
        if let FsOp::SyncFs(d) = op {
            self.0.lock().unwrap().push(d.to_owned());
        }
        Ok(())
    }
    fn after(&self, _: FsOp<'_>, _: bool) {}
}

#[test]
fn a_nar_directory_on_another_file_system_is_synced_too() {
    use std::os::unix::fs::MetadataExt;
    // The cache directory on the disk, `nar/` a link to a directory in /dev/shm.
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
    assert_ne!(
        dev(dir.path()),
        dev(shm.path()),
        "the test needs two file systems"
    );
    std::os::unix::fs::symlink(shm.path(), dir.path().join("nar")).unwrap();
    let synced = Arc::new(Synced::default());
    let c = FileCache::open_with_hook(dir.path(), "file:///t", Some(synced.clone())).unwrap();
    // A wave large enough for syncfs rather than file by file.
    let infos: Vec<NarInfo> = (0..SMALL_WAVE)
        .map(|i| committed(&c, &format!("p{i}"), format!("nar {i}").as_bytes()))
        .collect();
    let published = c.publish_narinfos("/nix/store", infos).unwrap();
    assert!(published.iter().all(|r| r.is_ok()));
    let synced = synced.0.lock().unwrap().clone();
    assert_eq!(synced, vec![dir.path().to_owned(), dir.path().join("nar")]);
}

#[test]
fn a_publishing_lock_held_elsewhere_is_waited_for_a_bounded_time() {
    let (dir, c) = cache();
    let held = File::create(dir.path().join(LOCK_FILE)).unwrap();
    held.lock().unwrap();
    let e = c.lock_publishing(Duration::from_millis(50)).unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(e.to_string().contains("held by another writer"), "{e}");
    drop(held);
    assert!(c.lock_publishing(Duration::from_millis(50)).is_ok());
}

#[test]
fn sweep_removes_only_stale_temporary_files() {
    let (dir, c) = cache();
    let old = std::time::SystemTime::now() - Duration::from_secs(7200);
    let mut expect = vec![];
    for (name, stale) in [
        (".narflow-tmp-a1", true),
        ("nar/.narflow-tmp-b2", true),
        (".narflow-tmp-young", false),
        ("nar/.narflow-tmp-young", false),
        ("stale.narinfo", false),
        ("nar/stale.nar.zst", false),
        (LOCK_FILE, false),
    ] {
        let f = File::create(dir.path().join(name)).unwrap();
        if stale || !name.contains(TEMP_PREFIX) {
            f.set_modified(old).unwrap();
        }
        if !stale {
            expect.push(name.to_owned());
        }
    }
    assert_eq!(c.sweep_orphans(Duration::from_secs(3600)).unwrap(), 2);
    expect.sort();
    assert_eq!(listing(dir.path()), expect);
    assert_eq!(c.sweep_orphans(Duration::from_secs(3600)).unwrap(), 0);
}

#[test]
fn a_streamed_object_is_named_by_its_commit_alone() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, c) = cache();
    let mut up = c.begin_object(0, "text/plain").unwrap();
    for _ in 0..4 {
        up.write_all(&[b'x'; 5 << 20]).unwrap();
    }
    // Being written for days, it is still this process's: a sweep leaves it.
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    for p in walk(dir.path()) {
        File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
    }
    assert_eq!(c.sweep_orphans(Duration::from_secs(86_400)).unwrap(), 0);
    up.written();
    up.commit("log/x.drv").unwrap();
    // No sync: the commit made it durable and named it, in a directory of its own.
    assert_eq!(listing(dir.path()), vec!["log/x.drv"]);
    let p = dir.path().join("log/x.drv");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 20 << 20);
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // Uncommitted: nothing, not even its temporary file.
    let mut up = c.begin_object(0, "text/plain").unwrap();
    up.write_all(b"partial").unwrap();
    drop(up);
    assert_eq!(listing(dir.path()), vec!["log/x.drv"]);
}

/// Writes `log/x.drv` (three writes) through `c`'s streaming upload.
fn stream_object(c: &FileCache) -> Result<(), String> {
    let mut up = c.begin_object(0, "text/plain").map_err(|e| e.to_string())?;
    for _ in 0..3 {
        up.write_all(&[b'x'; 1000]).map_err(|e| e.to_string())?;
    }
    up.written();
    up.commit("log/x.drv").map_err(|e| e.to_string())
}

#[test]
fn a_streamed_object_failing_at_any_operation_leaves_no_partial_object() {
    let (_dir, c, plan) = faulty(Fail::Never);
    stream_object(&c).unwrap();
    let ops = plan.ops();
    assert!(ops >= 7, "{ops}");
    for k in 0..ops {
        let (dir, c, plan) = faulty(Fail::Nth(k));
        let e = stream_object(&c).unwrap_err();
        assert_eq!(plan.fired().len(), 1, "operation {k}: {e}");
        // No temporary file is left; the object is whole or absent (only the last
        // operation, the directory's fsync, fails after the rename).
        let left = listing(dir.path());
        assert!(
            left.is_empty() || left == ["log/x.drv"],
            "operation {k}: {left:?}"
        );
        if !left.is_empty() {
            assert_eq!(k, ops - 1, "named before operation {k} failed: {e}");
            let len = std::fs::metadata(dir.path().join("log/x.drv"))
                .unwrap()
                .len();
            assert_eq!(len, 3000);
        }
    }
}

#[test]
fn the_gc_marker_is_read_as_written_and_its_absence_is_none() {
    use crate::cache::gc_marker::{MARKER_KEY, Marker};
    let (dir, c) = cache();
    assert_eq!(crate::cache::read_gc_marker(&c).unwrap(), None);
    let m = Marker {
        generation: 0xabc,
        running: true,
        beat: 3,
    };
    std::fs::write(dir.path().join(MARKER_KEY), m.render()).unwrap();
    assert_eq!(crate::cache::read_gc_marker(&c).unwrap(), Some(Some(m)));
    std::fs::write(dir.path().join(MARKER_KEY), "not a marker").unwrap();
    assert_eq!(crate::cache::read_gc_marker(&c).unwrap(), Some(None));
}

#[test]
fn deleting_removes_each_file_and_syncs_each_directory_a_file_left() {
    let (dir, c, plan) = faulty(Fail::Never);
    std::fs::create_dir_all(dir.path().join("nar")).unwrap();
    for key in ["a.narinfo", "a.ls", "nar/a.nar.zst", "b.narinfo"] {
        std::fs::write(dir.path().join(key), key).unwrap();
    }
    let keys: Vec<String> = ["a.narinfo", "a.ls", "nar/a.nar.zst", "gone.narinfo"]
        .map(String::from)
        .to_vec();
    let failed = c.delete_objects(&keys).unwrap();
    assert!(
        failed.is_empty(),
        "a missing key counts as deleted: {failed:?}"
    );
    assert_eq!(listing(dir.path()), vec!["b.narinfo"]);
    let ops = plan.ops();
    assert!(ops >= 6, "four removals and two directory syncs: {ops}");
    // Keys that leave the cache directory are refused, and nothing outside is touched.
    let outside = dir.path().parent().unwrap().join("outside-gc-test");
    let keys: Vec<String> = ["../outside-gc-test", "/etc/passwd", ""]
        .map(String::from)
        .to_vec();
    let failed = c.delete_objects(&keys).unwrap();
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(!outside.exists());
}

#[test]
fn a_failed_removal_is_named_and_a_failed_directory_sync_is_an_error() {
    fn is_remove_of_b(op: FsOp<'_>) -> bool {
        matches!(op, FsOp::Remove(p) if p.ends_with("b.narinfo"))
    }
    let (dir, c, plan) = faulty(Fail::Matching {
        matches: is_remove_of_b,
        times: 1,
    });
    for key in ["a.narinfo", "b.narinfo"] {
        std::fs::write(dir.path().join(key), key).unwrap();
    }
    let keys: Vec<String> = ["a.narinfo", "b.narinfo"].map(String::from).to_vec();
    let failed = c.delete_objects(&keys).unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "b.narinfo");
    assert!(
        failed[0].1.is_transient(),
        "a full disk heals: {}",
        failed[0].1
    );
    assert_eq!(plan.fired().len(), 1);
    assert_eq!(listing(dir.path()), vec!["b.narinfo"]);

    // The removal went, but whether it survives a crash is unknown: an error, not done.
    fn is_dir_sync(op: FsOp<'_>) -> bool {
        matches!(op, FsOp::SyncDir(_))
    }
    let (dir, c, _plan) = faulty(Fail::Matching {
        matches: is_dir_sync,
        times: 1,
    });
    std::fs::write(dir.path().join("a.narinfo"), "a").unwrap();
    let e = c.delete_objects(&["a.narinfo".to_owned()]).unwrap_err();
    assert!(e.to_string().contains("a.narinfo"), "{e}");
}

#[test]
fn objects_are_read_streamed_and_deleted_by_key_and_only_inside_the_cache() {
    let (dir, c) = cache();
    std::fs::create_dir_all(dir.path().join("nar")).unwrap();
    std::fs::write(dir.path().join("nar/a.nar"), b"nar bytes").unwrap();
    let mut back = Vec::new();
    c.read_object("nar/a.nar")
        .unwrap()
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, b"nar bytes");
    assert!(c.read_object("nar/missing.nar").unwrap().is_none());
    // A key never reaches outside the cache's directory.
    let outside = dir.path().parent().unwrap().join("outside-the-cache");
    assert!(c.read_object("../outside-the-cache").unwrap().is_none());
    let failed = c
        .delete_objects(&["nar/../../outside-the-cache".into()])
        .unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(!outside.exists() || outside.is_dir());
    // Deleting what is there and what is not.
    let failed = c
        .delete_objects(&["nar/a.nar".into(), "nar/never.nar".into()])
        .unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(!dir.path().join("nar/a.nar").exists());
}
