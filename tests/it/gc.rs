//! `narflow gc` against closures real Nix built and narflow pushed: A and B share a path,
//! C shares none. Keeping A's closure with `--grace 0` deletes exactly B's and C's other
//! paths and their NARs; A's closure stays substitutable by real Nix with signatures
//! required, `narflow verify --all` is clean, `--dry-run` deletes nothing and says the
//! same, a watcher reading the cache while gc deletes never sees a narinfo without its
//! NAR or a reference, and a second gc is refused while one runs.
//!
//! gc deletes whatever no root keeps in the whole cache, so on S3 it runs only in a
//! bucket of its own (`NARFLOW_TEST_S3_GC_BUCKET`, made by `scripts/s3-server`), one test
//! at a time, never in the bucket the other tests share.
use crate::helpers::*;
use narflow::cache::{self, BinaryCache};
use narflow::format::narinfo::NarInfo;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

pub(crate) const STORE_DIR: &str = "/nix/store";

/// The three closures, as real Nix built them.
pub(crate) struct Closures {
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) c: String,
    /// Every path of A's closure (which shares its base with B's).
    pub(crate) a_closure: Vec<String>,
    /// Paths of B's and C's closures outside A's.
    pub(crate) others: Vec<String>,
}

/// Builds A = a2 → a1 → s, B = b2 → b1 → s (sharing s with A), C = c2 → c1.
pub(crate) fn build() -> Closures {
    let u = unique("gc");
    let drv = |name: &str, body: &str| {
        format!(
            "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {u}-{name} {body} > $out\" ]; }}"
        )
    };
    let expr = format!(
        "let\n s = {};\n a1 = {};\n a2 = {};\n b1 = {};\n b2 = {};\n c1 = {};\n c2 = {};\nin [ a2 b2 c2 ]\n",
        drv("gc-s", ""),
        drv("gc-a1", "${s}"),
        drv("gc-a2", "${a1}"),
        drv("gc-b1", "${s}"),
        drv("gc-b2", "${b1}"),
        drv("gc-c1", ""),
        drv("gc-c2", "${c1}"),
    );
    let out = nix_build(&expr);
    let [a, b, c]: [String; 3] = out.try_into().expect("three outputs");
    let a_closure = nix_closure(&a);
    let mut others: BTreeSet<String> = nix_closure(&b).into_iter().collect();
    others.extend(nix_closure(&c));
    for p in &a_closure {
        others.remove(p);
    }
    assert_eq!(a_closure.len(), 3, "{a_closure:?}");
    assert_eq!(others.len(), 4, "{others:?}");
    Closures {
        a,
        b,
        c,
        a_closure,
        others: others.into_iter().collect(),
    }
}

pub(crate) fn push(url: &str, key: &NixKey, c: &Closures) {
    run(narflow()
        .args(["push", "--to", url, "--key-file"])
        .arg(&key.secret)
        .args([&c.a, &c.b, &c.c]));
}

pub(crate) fn open(url: &str) -> Box<dyn BinaryCache> {
    let u = cache::url::CacheUrl::parse(url).unwrap();
    cache::open(&u, &open_options(&u)).unwrap()
}

/// Every key of the cache but the gc marker.
fn keys(cache: &dyn BinaryCache) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    assert!(
        cache
            .list_objects(&mut |o| {
                if o.key != cache::gc_marker::MARKER_KEY {
                    keys.insert(o.key.to_owned());
                }
            })
            .unwrap()
    );
    keys
}

/// The narinfo of a store path, parsed.
pub(crate) fn narinfo(cache: &dyn BinaryCache, path: &str) -> Option<NarInfo> {
    let text = cache.get_text(&narinfo_key(path)).unwrap()?;
    Some(NarInfo::parse(&text, STORE_DIR).unwrap())
}

/// One look at the cache as a reader sees it: every narinfo listed, its NAR and each
/// reference's narinfo. Objects only go, never come back, while gc runs: a narinfo read
/// before, and still there after, a look that found its NAR or a reference missing
/// existed with it missing.
pub(crate) fn broken_closures(cache: &dyn BinaryCache) -> Vec<String> {
    let mut narinfos = Vec::new();
    cache
        .list_objects(&mut |o| {
            if o.key.ends_with(".narinfo") {
                narinfos.push(o.key.to_owned());
            }
        })
        .unwrap();
    let mut broken = Vec::new();
    for key in narinfos {
        let Some(text) = cache.get_text(&key).unwrap() else {
            continue;
        };
        let n = NarInfo::parse(&text, STORE_DIR).unwrap();
        let mut missing: Vec<String> = n
            .references
            .iter()
            .filter(|r| **r != n.store_path)
            .map(cache::narinfo_key)
            .filter(|k| !cache.has_object(k).unwrap())
            .collect();
        if !cache.has_object(&n.url).unwrap() {
            missing.push(n.url.clone());
        }
        if !missing.is_empty() && cache.has_object(&key).unwrap() {
            broken.push(format!("{key} without {missing:?}"));
        }
    }
    broken
}

/// Runs `narflow gc` with `args` on `url`; its exit code and JSON summary.
pub(crate) fn gc(url: &str, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = narflow()
        .args(["gc", "--json", "--gc-settle", "0", "--cache", url])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap(), json, stderr)
}

/// What `--json` says would go (or goes), by kind: objects.
fn to_delete(json: &serde_json::Value) -> [u64; 4] {
    ["narinfos", "listings", "nars", "logs"]
        .map(|k| json["delete"][k]["objects"].as_u64().expect("a count"))
}

/// `narflow verify --all` of `url`, trusting `key`: its exit code and output.
pub(crate) fn verify_all(url: &str, key: &NixKey) -> (i32, String) {
    let out = narflow()
        .args([
            "verify",
            "--all",
            "--cache",
            url,
            "--trusted-key",
            &key.public,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap(), text)
}

/// Checks the cache after gc kept A's closure: A's paths and NARs are there, B's and C's
/// others and their NARs are not, nothing else was touched (`before` less what went).
fn assert_only_others_went(
    cache: &dyn BinaryCache,
    c: &Closures,
    before: &BTreeSet<String>,
    others_nars: &[String],
) {
    for p in &c.a_closure {
        let n = narinfo(cache, p).unwrap_or_else(|| panic!("{p} of A's closure went"));
        assert!(cache.has_object(&n.url).unwrap(), "the NAR of {p} went");
    }
    let mut gone: BTreeSet<String> = c.others.iter().map(|p| narinfo_key(p)).collect();
    gone.extend(others_nars.iter().cloned());
    let after = keys(cache);
    let want: BTreeSet<String> = before.difference(&gone).cloned().collect();
    assert_eq!(
        after, want,
        "exactly B's and C's other paths and their NARs went"
    );
}

#[test]
fn gc_keeps_a_closure_and_deletes_the_rest_in_an_order_no_reader_can_see_broken() {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().display());
    let key = nix_generate_key(&unique("gc-a").replace('-', "")[..20]);
    let c = build();
    push(&url, &key, &c);
    let cache = open(&url);
    let before = keys(cache.as_ref());
    let others_nars: Vec<String> = c
        .others
        .iter()
        .map(|p| narinfo(cache.as_ref(), p).unwrap().url)
        .collect();
    assert_eq!(verify_all(&url, &key).0, 0);

    // A dry run says what would go and deletes nothing (nor writes its marker).
    let (code, dry, err) = gc(
        &url,
        &["--keep-closure-of", &c.a, "--grace", "0", "--dry-run"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(to_delete(&dry), [4, 0, 4, 0], "{dry}");
    let roots = dry["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{dry}");
    assert_eq!(roots[0]["why"], "keep-closure-of");
    assert_eq!(keys(cache.as_ref()), before);
    assert!(!dir.path().join(cache::gc_marker::MARKER_KEY).exists());

    // The default grace keeps everything just pushed.
    let (code, young, err) = gc(&url, &["--keep-closure-of", &c.a, "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(to_delete(&young), [0, 0, 0, 0], "{young}");

    // The real run, in this process: after each batch a watcher on another thread looks
    // at the whole cache before the next batch goes (and looks all along meanwhile).
    let stop = Arc::new(AtomicBool::new(false));
    let looks = Arc::new(AtomicUsize::new(0));
    // Rendezvous: a batch waits for one whole look after it.
    let (batch_done, batches) = mpsc::sync_channel::<mpsc::SyncSender<()>>(0);
    let watcher = {
        let (url, stop, looks) = (url.clone(), stop.clone(), looks.clone());
        std::thread::spawn(move || {
            let cache = open(&url);
            let mut broken = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let waiting = batches.try_recv().ok();
                broken.extend(broken_closures(cache.as_ref()));
                looks.fetch_add(1, Ordering::SeqCst);
                if let Some(ack) = waiting {
                    ack.send(()).unwrap();
                }
            }
            broken
        })
    };
    struct Handshake(mpsc::SyncSender<mpsc::SyncSender<()>>, usize);
    impl narflow::maintain::gc::GcObserver for Handshake {
        fn deleted(&mut self, _batch: &narflow::maintain::gc_plan::Batch) {
            // One acknowledgement, of this batch.
            let (ack, acked) = mpsc::sync_channel(1);
            self.0.send(ack).unwrap();
            acked.recv().unwrap();
            self.1 += 1;
        }
    }
    let cfg = narflow::maintain::gc::GcConfig {
        store_dir: STORE_DIR.to_owned(),
        roots: vec![(
            narflow::maintain::roots::parse_root(&c.a, STORE_DIR).unwrap(),
            narflow::maintain::gc_plan::RootReason::Closure,
        )],
        keep_newer_than: None,
        grace: std::time::Duration::ZERO,
        settle: std::time::Duration::ZERO,
        batch_size: 2,
        dry_run: false,
    };
    let mut handshake = Handshake(batch_done, 0);
    let outcome = narflow::maintain::gc::run(cache.as_ref(), &cfg, &mut handshake).unwrap();
    stop.store(true, Ordering::SeqCst);
    let broken = watcher.join().unwrap();
    assert_eq!(broken, Vec::<String>::new());
    assert_eq!(
        handshake.1, 4,
        "two layers of narinfos, then two batches of NARs"
    );
    assert!(looks.load(Ordering::SeqCst) >= 4);
    assert!(!outcome.has_problems(), "{outcome:?}");
    let d = outcome.plan.deleted;
    assert_eq!(
        [
            d.narinfos.objects,
            d.listings.objects,
            d.nars.objects,
            d.logs.objects
        ],
        to_delete(&dry),
        "the dry run said the same"
    );
    assert_eq!((outcome.deleted.narinfos, outcome.deleted.nars), (4, 4));

    assert_only_others_went(cache.as_ref(), &c, &before, &others_nars);
    let marker = cache
        .get_text(cache::gc_marker::MARKER_KEY)
        .unwrap()
        .unwrap();
    assert!(marker.contains("state done"), "{marker}");
    let (code, text) = verify_all(&url, &key);
    assert_eq!(code, 0, "{text}");
    assert_nix_substitutes(&url, &key, &c.a_closure);

    // Nothing more to do: a second run deletes nothing.
    let (code, again, err) = gc(&url, &["--keep-closure-of", &c.a, "--grace", "0"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(to_delete(&again), [0, 0, 0, 0], "{again}");
}

/// A fresh `file://` cache with a chain of two paths Nix built (named after `name`) pushed
/// into it, signed by a key of its own (named after `key_tag`): the cache's directory, its
/// URL, the key and the chain's top path.
fn pushed_chain(key_tag: &str, name: &str) -> (tempfile::TempDir, String, NixKey, String) {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().display());
    let key = nix_generate_key(&unique(key_tag).replace('-', "")[..20]);
    let top = nix_build_chain(name, 2);
    run(narflow()
        .args(["push", "--to", &url, "--key-file"])
        .arg(&key.secret)
        .arg(&top));
    (dir, url, key, top)
}

#[test]
fn a_root_the_cache_lacks_is_named_and_nothing_is_deleted() {
    let (_dir, url, _key, _top) = pushed_chain("gc-m", "gc-missing");
    let cache = open(&url);
    let before = keys(cache.as_ref());
    let absent = format!("{STORE_DIR}/0000000000000000000000000000000a-absent");
    for dry in [true, false] {
        let mut args = vec!["--keep-closure-of", &absent, "--grace", "0"];
        if dry {
            args.push("--dry-run");
        }
        let (code, _, err) = gc(&url, &args);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("0000000000000000000000000000000a"), "{err}");
        assert_eq!(keys(cache.as_ref()), before);
    }
    // No root at all is a usage error.
    let (code, _, err) = gc(&url, &["--grace", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_second_gc_is_refused_while_one_runs() {
    let (dir, url, _key, top) = pushed_chain("gc-r", "gc-refused");
    // The first gc waits longer than one heartbeat before it lists.
    let settle = cache::gc_marker::HEARTBEAT.as_secs() + 10;
    let mut first = narflow()
        .args([
            "gc",
            "--cache",
            &url,
            "--keep-closure-of",
            &top,
            "--grace",
            "0",
        ])
        .arg(format!("--gc-settle={settle}"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let marker = dir.path().join(cache::gc_marker::MARKER_KEY);
    let cache = open(&url);
    // Wait for its marker: the event the second gc must see.
    let started = std::time::Instant::now();
    while cache::read_gc_marker(cache.as_ref()).unwrap().is_none() {
        assert!(
            started.elapsed().as_secs() < 60,
            "the first gc never wrote {marker:?}"
        );
        std::thread::yield_now();
    }
    let (code, _, err) = gc(&url, &["--keep-closure-of", &top, "--grace", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("another gc is running"), "{err}");
    assert!(first.wait().unwrap().success());
    // Done: the next one runs.
    let (code, _, err) = gc(&url, &["--keep-closure-of", &top, "--grace", "0"]);
    assert_eq!(code, 0, "{err}");
}

/// The S3 tests' gc bucket (none: skipped, saying why).
pub(crate) fn s3_gc_bucket() -> Option<(S3Env, String)> {
    let s3 = s3_env()?;
    let Ok(bucket) = std::env::var("NARFLOW_TEST_S3_GC_BUCKET") else {
        println!(
            "skipped: NARFLOW_TEST_S3_GC_BUCKET is not set (scripts/s3-server start makes the bucket gc may empty)"
        );
        return None;
    };
    let mut env = s3.clone();
    env.bucket = bucket.clone();
    let url = env.url("");
    Some((env, url))
}

/// One S3 gc test at a time: gc empties what it does not keep in the whole bucket.
pub(crate) static S3_GC: Mutex<()> = Mutex::new(());

#[test]
fn gc_on_s3_deletes_in_batches_while_a_watcher_reads() {
    let Some((_env, url)) = s3_gc_bucket() else {
        return;
    };
    let _one = S3_GC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Start from an empty bucket: an empty keep-file keeps nothing.
    let empty = tempdir();
    let none = empty.path().join("keep");
    std::fs::write(&none, "").unwrap();
    let none = none.to_str().unwrap();
    let (code, _, err) = gc(&url, &["--keep-file", none, "--grace", "0"]);
    assert_eq!(code, 0, "{err}");

    let key = nix_generate_key(&unique("gc-s").replace('-', "")[..20]);
    let c = build();
    push(&url, &key, &c);
    let cache = open(&url);
    let before = keys(cache.as_ref());
    let others_nars: Vec<String> = c
        .others
        .iter()
        .map(|p| narinfo(cache.as_ref(), p).unwrap().url)
        .collect();

    let (code, dry, err) = gc(
        &url,
        &["--keep-closure-of", &c.a, "--grace", "0", "--dry-run"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(to_delete(&dry), [4, 0, 4, 0], "{dry}");
    assert_eq!(keys(cache.as_ref()), before);

    // The real run, through the command, two keys a DeleteObjects request, while a
    // watcher reads the bucket until it exits.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let cache = open(&url);
            let mut broken = Vec::new();
            let mut looks = 0;
            while !stop.load(Ordering::SeqCst) {
                broken.extend(broken_closures(cache.as_ref()));
                looks += 1;
            }
            (broken, looks)
        })
    };
    let (code, real, err) = gc(
        &url,
        &[
            "--keep-closure-of",
            &c.a,
            "--grace",
            "0",
            "--gc-batch-size",
            "2",
        ],
    );
    stop.store(true, Ordering::SeqCst);
    let (broken, looks) = watcher.join().unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(broken, Vec::<String>::new(), "after {looks} looks");
    assert_eq!(to_delete(&real), to_delete(&dry));
    assert_eq!(real["deleted"]["narinfos"], 4, "{real}");
    assert_eq!(real["deleted"]["nars"], 4, "{real}");
    assert_only_others_went(cache.as_ref(), &c, &before, &others_nars);
    assert_eq!(verify_all(&url, &key).0, 0);
}

#[test]
fn a_gc_that_finds_another_generation_in_its_marker_stops_and_deletes_nothing() {
    let (_dir, url, _key, _top) = pushed_chain("gc-l", "gc-lost");
    let cache = open(&url);
    let before = keys(cache.as_ref());
    let cfg = narflow::maintain::gc::GcConfig {
        store_dir: STORE_DIR.to_owned(),
        roots: Vec::new(),
        keep_newer_than: None,
        grace: std::time::Duration::ZERO,
        // Longer than a heartbeat: the read-back before it finds the other marker.
        settle: cache::gc_marker::HEARTBEAT * 2,
        batch_size: 2,
        dry_run: false,
    };
    let gc = {
        let url = url.clone();
        std::thread::spawn(move || narflow::maintain::gc::run(open(&url).as_ref(), &cfg, &mut ()))
    };
    // Once its marker is there, another gc (started in the same moment) writes its own.
    let started = std::time::Instant::now();
    while cache::read_gc_marker(cache.as_ref()).unwrap().is_none() {
        assert!(started.elapsed().as_secs() < 60, "no marker");
        std::thread::yield_now();
    }
    let other = cache::gc_marker::Marker {
        generation: 7,
        running: true,
        beat: 0,
    };
    cache
        .put_object(
            cache::gc_marker::MARKER_KEY,
            other.render().as_bytes(),
            "text/plain",
        )
        .unwrap();
    let e = gc.join().unwrap().unwrap_err();
    assert!(
        matches!(e, narflow::maintain::gc::GcError::Lost { .. }),
        "{e}"
    );
    assert_eq!(keys(cache.as_ref()), before, "nothing deleted");
    assert_eq!(
        cache::read_gc_marker(cache.as_ref()).unwrap(),
        Some(Some(other)),
        "the other gc's marker is left as it is"
    );
}

/// Pushes A, B and C into an emptied gc bucket; its URL through `proxy`, with the
/// closures, the key and the bucket's keys.
fn fresh_bucket_through(
    env: &S3Env,
    url: &str,
    proxy: &crate::proxy::Proxy,
) -> (String, Closures, BTreeSet<String>) {
    let empty = tempdir();
    let none = empty.path().join("keep");
    std::fs::write(&none, "").unwrap();
    let (code, _, err) = gc(
        url,
        &["--keep-file", none.to_str().unwrap(), "--grace", "0"],
    );
    assert_eq!(code, 0, "{err}");
    let key = nix_generate_key(&unique("gc-p").replace('-', "")[..20]);
    let c = build();
    push(url, &key, &c);
    let before = keys(open(url).as_ref());
    (env.url_at(&proxy.endpoint(), "&retries=1"), c, before)
}

#[test]
fn gc_on_s3_checks_deletions_whose_answer_is_lost_and_stops_at_one_that_failed() {
    use crate::proxy::{Fault, Kind, Proxy, Rule};
    let Some((env, url)) = s3_gc_bucket() else {
        return;
    };
    let _one = S3_GC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);

    // Every DeleteObjects is done by the server, but its answer cannot be read: each key
    // is looked up, found gone, and the sweep goes on to the end.
    let proxy = Proxy::start(
        &env.endpoint,
        vec![Rule::after(
            Kind::DeleteObjects,
            0,
            usize::MAX,
            Fault::UnreadableIn200,
        )],
    );
    let (via, c, before) = fresh_bucket_through(&env, &url, &proxy);
    let cache = open(&url);
    let others_nars: Vec<String> = c
        .others
        .iter()
        .map(|p| narinfo(cache.as_ref(), p).unwrap().url)
        .collect();
    let (code, out, err) = gc(&via, &["--keep-closure-of", &c.a, "--grace", "0"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out["deleted"]["narinfos"], 4, "{out}");
    assert_eq!(out["deleted"]["nars"], 4, "{out}");
    assert!(
        proxy.faults(|f| f == Fault::UnreadableIn200) >= 3,
        "{}",
        proxy.dump()
    );
    assert!(proxy.forwarded(Kind::Head) >= 8, "each key was looked up");
    assert_only_others_went(cache.as_ref(), &c, &before, &others_nars);
    drop(proxy);

    // The second DeleteObjects never reaches the server (a reset, retried once): its keys
    // are still there, named, and nothing after it goes.
    let proxy = Proxy::start(
        &env.endpoint,
        vec![Rule::after(
            Kind::DeleteObjects,
            1,
            usize::MAX,
            Fault::Reset,
        )],
    );
    let (via, c, before) = fresh_bucket_through(&env, &url, &proxy);
    let (code, out, err) = gc(
        &via,
        &[
            "--keep-closure-of",
            &c.a,
            "--grace",
            "0",
            "--gc-batch-size",
            "2",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(out["deleted"]["narinfos"], 2, "{out}");
    assert_eq!(out["failed"].as_array().unwrap().len(), 2, "{out}");
    assert!(out["stopped"].is_string(), "{out}");
    let cache = open(&url);
    assert_eq!(broken_closures(cache.as_ref()), Vec::<String>::new());
    let after = keys(cache.as_ref());
    assert_eq!(before.len() - after.len(), 2, "only the first batch went");
    assert!(
        before
            .iter()
            .filter(|k| k.starts_with("nar/"))
            .all(|k| after.contains(k))
    );
}
