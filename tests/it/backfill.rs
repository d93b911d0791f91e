//! `narflow backfill` against the real Nix store: a generated store of 5,000 small paths
//! that reference each other (made once per machine), kill -9 half way and resume; the
//! skips, the dry run and `--derivations`, counted; a registration out of topological
//! order; the S3 listing.
//!
//! Other tests add paths to the store all the time, so a walk of the whole store runs
//! here only as a dry run into a fresh cache, or bounded by `--since` with assertions on
//! this test's own paths; exact counts come from backfilling named paths.
use crate::helpers::*;
use narflow::format::store_path::StorePath;
use std::io::Write;
use std::process::{Command, Output, Stdio};

const STORE_DIR: &str = "/nix/store";

fn cache_url(dir: &std::path::Path) -> String {
    format!("file://{}", dir.display())
}

fn summary(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON summary ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// `narflow backfill --json --to URL --key-file KEY ARGS...`, which must succeed.
fn backfill(url: &str, key: &NixKey, args: &[&str]) -> serde_json::Value {
    let out = run(narflow()
        .args(["backfill", "--json", "--to", url, "--key-file"])
        .arg(&key.secret)
        .args(args));
    summary(&out)
}

fn narinfos(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
                .count()
        })
        .unwrap_or(0)
}

fn has_narinfo(dir: &std::path::Path, full: &str) -> bool {
    dir.join(narinfo_key(full)).exists()
}

/// A store path for `seed`, its hash part derived from the seed (so the order of the
/// hash parts, which is the order `--register-validity` registers a batch in, is chosen
/// by the caller through the seed).
fn seeded_path(seed: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(seed.as_bytes());
    let hash = narflow::format::nix32::encode(&d[..20]);
    format!("{STORE_DIR}/{hash}-{seed}")
}

/// Writes each path's file (its references named in it) and registers the batch with
/// `nix-store --register-validity --hash-given` (Nix registers a batch in store-path
/// order). `refs[i]` are the references of `paths[i]`, in this batch or valid already.
fn register(paths: &[String], refs: &[Vec<String>]) {
    let mut input = String::new();
    for (p, r) in paths.iter().zip(refs) {
        if !std::path::Path::new(p).exists() {
            std::fs::write(p, format!("{p}\n{}\n", r.join("\n"))).unwrap();
        }
        let sp = StorePath::from_absolute_path(p, STORE_DIR).unwrap();
        let r_sp: Vec<StorePath> = r
            .iter()
            .map(|x| StorePath::from_absolute_path(x, STORE_DIR).unwrap())
            .collect();
        let info =
            narflow::store::PathInfo::of_tree(sp, std::path::Path::new(p), r_sp, None).unwrap();
        input.push_str(&format!(
            "{p}\nsha256:{}\n{}\n\n{}\n",
            info.nar_hash.to_base16(),
            info.nar_size,
            r.len()
        ));
        for x in r {
            input.push_str(x);
            input.push('\n');
        }
    }
    let mut child = Command::new("nix-store")
        .args(["--register-validity", "--hash-given"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nix-store --register-validity: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The file listing a generated store of `n` paths for `tag`, made once per machine: `n`
/// small files in batches of 250, each path referring to one path of the batch before
/// and to the path at half its index (when that is in an earlier batch), so every
/// reference is registered before its referrer and closures are deep. Returns the paths
/// in generation order.
fn generated_store(tag: &str, n: usize) -> Vec<String> {
    const BATCH: usize = 250;
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let list = std::env::temp_dir().join(format!("narflow-test-store-{tag}-{n}.paths"));
    let lock = std::fs::File::create(list.with_extension("lock")).unwrap();
    lock.lock().unwrap();
    if let Ok(text) = std::fs::read_to_string(&list) {
        let paths: Vec<String> = text.lines().map(str::to_owned).collect();
        let valid = Command::new("nix-store")
            .arg("--check-validity")
            .args([&paths[0], &paths[n - 1]])
            .status()
            .unwrap()
            .success();
        if paths.len() == n && valid {
            return paths;
        }
    }
    let paths: Vec<String> = (0..n)
        .map(|i| seeded_path(&format!("bf-{tag}-{i}")))
        .collect();
    let refs: Vec<Vec<String>> = (0..n)
        .map(|i| {
            let batch = i / BATCH;
            let mut r = Vec::new();
            if batch > 0 {
                r.push(paths[(batch - 1) * BATCH + (i * 7) % BATCH].clone());
                if i / 2 < batch * BATCH && i / 2 != (batch - 1) * BATCH + (i * 7) % BATCH {
                    r.push(paths[i / 2].clone());
                }
            }
            r.sort();
            r
        })
        .collect();
    for start in (0..n).step_by(BATCH) {
        let end = (start + BATCH).min(n);
        register(&paths[start..end], &refs[start..end]);
    }
    let tmp = list.with_extension("tmp");
    std::fs::write(&tmp, paths.join("\n")).unwrap();
    std::fs::rename(&tmp, &list).unwrap();
    paths
}

/// Starts `narflow backfill --json` into `url`, signed with `key`, its state in `state`,
/// with `args` and, if given, the paths on its stdin.
fn spawn_backfill(
    url: &str,
    key: &NixKey,
    state: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> std::process::Child {
    let mut child = narflow()
        .args(["backfill", "--json", "--to", url, "--key-file"])
        .arg(&key.secret)
        .arg("--state")
        .arg(state)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child
}

/// Kills `child` (SIGKILL) once `dir` holds at least `n` narinfos, and reaps it.
fn kill_once_it_has(child: &mut std::process::Child, dir: &std::path::Path, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while narinfos(dir) < n {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backfill ended before {n} narinfos"
        );
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::yield_now();
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The saved state's cursor.
fn saved_cursor(state: &std::path::Path) -> i64 {
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state).expect("a state file")).unwrap();
    saved["cursor"].as_i64().unwrap()
}

/// The summary of the resumed backfill `child`, which must succeed from `cursor`.
fn resumed(child: std::process::Child, cursor: i64) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&out);
    assert_eq!(s["resumed_from"].as_i64(), Some(cursor), "{s}");
    s
}

/// Every one of `paths` has a narinfo in `dir` signed by `key_name`.
fn assert_signed(dir: &std::path::Path, paths: &[String], key_name: &str) {
    for p in paths {
        let text = std::fs::read_to_string(dir.join(narinfo_key(p)))
            .unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(
            text.contains(&format!("\nSig: {key_name}:")),
            "{p}:\n{text}"
        );
    }
}

#[test]
fn a_backfill_killed_half_way_resumes_and_uploads_only_what_was_missing() {
    const WINDOW: usize = 500;
    let paths = generated_store("5k", 5000);
    let key = nix_generate_key("narflow-backfill-1");
    let cache = tempdir();
    let url = cache_url(cache.path());
    let state = cache.path().join("state.json");
    let stdin = paths.join("\n");
    let window = WINDOW.to_string();
    let spawn = || {
        spawn_backfill(
            &url,
            &key,
            &state,
            &["--window", &window, "-"],
            Some(&stdin),
        )
    };
    let mut child = spawn();
    kill_once_it_has(&mut child, cache.path(), paths.len() / 2);
    let before = narinfos(cache.path());
    assert!(before < paths.len(), "killed after the end");
    // The cursor counts named paths done, in the order given (references first): every
    // one before it is up, and at most the two windows in flight went up past it.
    let cursor = saved_cursor(&state);
    assert!(cursor > 0, "the cursor moved");
    for p in &paths[..cursor as usize] {
        assert!(has_narinfo(cache.path(), p), "{p} is before the cursor");
    }
    assert!(
        before - cursor as usize <= 2 * WINDOW,
        "{before} narinfos, but the cursor is at {cursor}: more than two windows in flight"
    );

    let s = resumed(spawn(), cursor);
    assert_eq!(
        s["uploaded"].as_u64(),
        Some((paths.len() - before) as u64),
        "{s}"
    );
    assert_eq!(s["failed"].as_u64(), Some(0), "{s}");
    assert_signed(cache.path(), &paths, "narflow-backfill-1");
    let sample: Vec<String> = [10, 2600, 4999].iter().map(|&i| paths[i].clone()).collect();
    assert_nix_substitutes(&url, &key, &sample);

    // Finished: a rerun has nothing past its cursor.
    let again = run(narflow()
        .args([
            "backfill",
            "--json",
            "--window",
            "500",
            "--to",
            &url,
            "--key-file",
        ])
        .arg(&key.secret)
        .arg("--state")
        .arg(&state)
        .args(&paths[..1]));
    let again = summary(&again);
    assert_eq!(again["uploaded"].as_u64(), Some(0), "{again}");
}

/// The store walk (`--all`, here bounded by `--since` to a store generated for this run:
/// other tests register paths meanwhile) killed half way: the saved cursor is a
/// `ValidPaths` id that every path below it is up to, with at most two windows past it,
/// and a rerun resumes there and finishes the rest.
#[test]
fn a_store_walk_killed_half_way_resumes_from_its_cursor() {
    const WINDOW: usize = 200;
    const N: usize = 2000;
    let store = narflow::store::LocalStore::open(
        STORE_DIR,
        std::path::Path::new("/nix/var/nix/db/db.sqlite"),
    );
    let since = stdout(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    let first = store.last_valid_id().unwrap();
    let paths = generated_store(&unique("walk"), N);
    // Our paths' ids (others may be registered between them).
    let mut ids = std::collections::HashMap::new();
    let mut after = first;
    while ids.len() < N {
        let rows = store.valid_after(after, 1000).unwrap();
        assert!(!rows.is_empty(), "our paths are registered");
        after = rows.last().unwrap().id;
        for r in rows {
            ids.insert(r.path.to_absolute(STORE_DIR), r.id);
        }
        ids.retain(|p, _| paths.contains(p));
    }
    let key = nix_generate_key("narflow-backfill-5");
    let cache = tempdir();
    let url = cache_url(cache.path());
    let state = cache.path().join("state.json");
    let window = WINDOW.to_string();
    let args = ["--window", &window, "--since", &since];
    let mut child = spawn_backfill(&url, &key, &state, &args, None);
    // Half way, once a cursor is saved: the walk takes in the paths other tests register
    // meanwhile too (and what they refer to), so its first window may hold more than
    // half of ours.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while !state.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backfill ended before it saved a cursor"
        );
        assert!(std::time::Instant::now() < deadline, "no cursor saved");
        std::thread::yield_now();
    }
    kill_once_it_has(&mut child, cache.path(), N / 2);
    let cursor = saved_cursor(&state);
    let ahead = paths
        .iter()
        .filter(|p| has_narinfo(cache.path(), p) && ids[*p] > cursor)
        .count();
    let behind: Vec<&String> = paths.iter().filter(|p| ids[*p] <= cursor).collect();
    assert!(!behind.is_empty(), "the cursor moved past our first window");
    assert!(behind.len() < N, "killed after the end");
    for p in &behind {
        assert!(
            has_narinfo(cache.path(), p),
            "{p} is below the cursor {cursor}"
        );
    }
    assert!(
        ahead <= 2 * WINDOW,
        "{ahead} of our paths are up past the cursor {cursor}: more than two windows"
    );

    let s = resumed(spawn_backfill(&url, &key, &state, &args, None), cursor);
    assert!(
        s["already_present"].as_u64().unwrap() >= ahead as u64,
        "what went up past the cursor is found present: {s}"
    );
    assert_signed(cache.path(), &paths, "narflow-backfill-5");
    let sample = [paths[0].clone(), paths[N / 2].clone(), paths[N - 1].clone()];
    assert_nix_substitutes(&url, &key, &sample);
}

/// Three chained outputs built by real Nix (the last one's closure is all three), and the
/// last one's .drv.
struct Chain {
    outs: Vec<String>,
    drv: String,
}

fn chain(tag: &str) -> Chain {
    let top = nix_build_chain(tag, 3);
    let mut outs = nix_closure(&top);
    outs.sort();
    assert_eq!(outs.len(), 3);
    let drv = stdout(Command::new("nix-store").args(["-q", "--deriver", &top]));
    Chain { outs, drv }
}

#[test]
fn skips_the_dry_run_and_derivations_change_what_goes_up() {
    let c = chain("backfill-skips");
    let top = c
        .outs
        .iter()
        .find(|o| nix_closure(o).len() == 3)
        .expect("the chain's last output")
        .clone();
    let key = nix_generate_key("narflow-backfill-2");
    let nar_size: u64 = nix_path_info(None, &c.outs)
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["narSize"].as_u64().unwrap())
        .sum();

    // Dry run: the numbers, and nothing written.
    let dry = tempdir();
    let state = dry.path().join("state.json");
    let s = backfill(
        &cache_url(&dry.path().join("c")),
        &key,
        &["--dry-run", "--state", state.to_str().unwrap(), &top],
    );
    assert_eq!(
        (s["paths"].as_u64(), s["nar_bytes"].as_u64()),
        (Some(3), Some(nar_size)),
        "{s}"
    );
    assert_eq!(narinfos(&dry.path().join("c")), 0);
    assert!(!state.exists());

    // Everything, for reference.
    let all = tempdir();
    let s = backfill(
        &cache_url(all.path()),
        &key,
        &["--state", all.path().join("s").to_str().unwrap(), &top],
    );
    assert_eq!(
        (s["uploaded"].as_u64(), s["nar_bytes"].as_u64()),
        (Some(3), Some(nar_size)),
        "{s}"
    );

    // --skip-signed-by: the path signed by the other key stays out; its referrer still
    // goes up (clients get it from upstream).
    let other = nix_generate_key("upstream-test-1");
    // The chain's first output: it has no references, so an upstream can take it alone.
    let signed = c
        .outs
        .iter()
        .find(|o| nix_closure(o).len() == 1)
        .unwrap()
        .clone();
    run(Command::new("nix")
        .args(["store", "sign", "--key-file"])
        .arg(&other.secret)
        .arg(&signed));
    let dir = tempdir();
    let s = backfill(
        &cache_url(dir.path()),
        &key,
        &[
            "--skip-signed-by",
            "upstream-test-1",
            "--state",
            dir.path().join("s").to_str().unwrap(),
            &top,
        ],
    );
    assert_eq!(s["uploaded"].as_u64(), Some(2), "{s}");
    assert_eq!(s["skipped"]["signed_by"].as_u64(), Some(1), "{s}");
    assert!(!has_narinfo(dir.path(), &signed) && has_narinfo(dir.path(), &top));

    // --skip-upstream: what a local upstream serves stays out.
    let up = tempdir();
    run(narflow()
        .args([
            "push",
            "--no-closure",
            "--to",
            &cache_url(up.path()),
            "--key-file",
        ])
        .arg(&other.secret)
        .arg(&signed));
    let dir = tempdir();
    let s = backfill(
        &cache_url(dir.path()),
        &key,
        &[
            "--skip-upstream",
            &cache_url(up.path()),
            "--state",
            dir.path().join("s").to_str().unwrap(),
            &top,
        ],
    );
    assert_eq!(s["uploaded"].as_u64(), Some(2), "{s}");
    assert_eq!(s["skipped"]["upstream"].as_u64(), Some(1), "{s}");
    assert!(!has_narinfo(dir.path(), &signed));

    // --derivations: a .drv named goes up only with it (its closure is the chain's three
    // .drv files).
    let dir = tempdir();
    let st = dir.path().join("s");
    let s = backfill(
        &cache_url(dir.path()),
        &key,
        &["--state", st.to_str().unwrap(), &c.drv],
    );
    assert_eq!(s["uploaded"].as_u64(), Some(0), "{s}");
    let s = backfill(
        &cache_url(dir.path()),
        &key,
        &["--derivations", "--state", st.to_str().unwrap(), &c.drv],
    );
    assert_eq!(
        s["uploaded"].as_u64(),
        Some(nix_closure(&c.drv).len() as u64),
        "{s}"
    );
    assert!(has_narinfo(dir.path(), &c.drv));
}

#[test]
fn a_whole_store_dry_run_writes_nothing() {
    let key = nix_generate_key("narflow-backfill-3");
    let dir = tempdir();
    let s = backfill(
        &cache_url(&dir.path().join("c")),
        &key,
        &[
            "--all",
            "--dry-run",
            "--state",
            dir.path().join("s").to_str().unwrap(),
        ],
    );
    assert!(s["paths"].as_u64().unwrap() > 0, "{s}");
    assert!(s["nar_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(!dir.path().join("c").join("nix-cache-info").exists());
    assert!(!dir.path().join("s").exists());
}

#[test]
fn a_reference_registered_after_its_referrer_goes_up_first() {
    // Nix registers a --register-validity batch in store-path order: the referrer's hash
    // part is made to sort first, so it gets the lower id.
    let u = unique("bf-order");
    let (referrer, reference) = loop {
        let (a, b) = (
            seeded_path(&format!("{u}-top-{}", unique("x"))),
            seeded_path(&format!("{u}-dep")),
        );
        if a < b {
            break (a, b);
        }
    };
    let since = stdout(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]));
    register(
        &[referrer.clone(), reference.clone()],
        &[vec![reference.clone()], vec![]],
    );
    let store = narflow::store::LocalStore::open(
        STORE_DIR,
        std::path::Path::new("/nix/var/nix/db/db.sqlite"),
    );
    let last = store.last_valid_id().unwrap();
    let rows = store.valid_after(last - 1000, 1000).unwrap();
    let id = |p: &str| {
        rows.iter()
            .find(|r| r.path.to_absolute(STORE_DIR) == p)
            .unwrap_or_else(|| panic!("{p} not among the last rows"))
            .id
    };
    assert!(
        id(&referrer) < id(&reference),
        "the test needs the referrer registered first"
    );

    let key = nix_generate_key("narflow-backfill-4");
    let dir = tempdir();
    let url = cache_url(dir.path());
    let out = narflow()
        .args([
            "backfill", "--json", "--window", "1", "--since", &since, "--to", &url,
        ])
        .arg("--key-file")
        .arg(&key.secret)
        .arg("--state")
        .arg(dir.path().join("s"))
        .output()
        .unwrap();
    let s = summary(&out);
    let failures = s["failures"].to_string();
    assert!(!failures.contains(&u), "{s}");
    assert!(s["pulled_in"].as_u64().unwrap() >= 1, "{s}");
    assert!(has_narinfo(dir.path(), &referrer) && has_narinfo(dir.path(), &reference));
    assert_nix_substitutes(&url, &key, std::slice::from_ref(&referrer));
}

#[test]
fn the_s3_listing_names_every_narinfo_at_the_bucket_root_page_after_page() {
    let Some(s3) = s3_env() else { return };
    let dir = tempdir();
    let file = dir.path().join(unique("bf-s3-list"));
    std::fs::write(&file, unique("content")).unwrap();
    let path = nix_store_add(&file);
    let url = s3.url("");
    run(narflow()
        .args(["push", "--unsigned", "--to", &url])
        .arg(&path));
    let client = s3.client();
    // What is there now (other tests only add narinfos): every one must be listed.
    let before: Vec<String> = client
        .list("")
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !k.contains('/') && k.ends_with(".narinfo"))
        .collect();
    // A key that names no hash part, and another object of a hash part, are not narinfos.
    let other =
        StorePath::from_absolute_path(&seeded_path(&unique("bf-s3-ls")), STORE_DIR).unwrap();
    client.put(&format!("{}.ls", other.hash_part()), b"{}");
    client.put(&format!("{}.narinfo", unique("not-a-hash")), b"x");

    let parsed = narflow::cache::url::CacheUrl::parse(&url).unwrap();
    let cache = narflow::cache::open(&parsed, &open_options(&parsed)).unwrap();
    let set = cache.list_narinfos().unwrap().expect("S3 lists");
    let ours = StorePath::from_absolute_path(&path, STORE_DIR).unwrap();
    assert!(set.contains(&ours));
    assert!(!set.contains(&other));
    // The bucket holds more than one page (1,000 keys) as soon as the suite has run a
    // while: every narinfo there before must come back, whatever page it was on.
    let mut checked = 0;
    for key in &before {
        if let Some(h) = narflow::cache::narinfo_hash(key.as_bytes()) {
            assert!(set.contains_key(&h), "{key} is not in the listing");
            checked += 1;
        }
    }
    println!("{} narinfos listed, {checked} checked", set.len());
}
