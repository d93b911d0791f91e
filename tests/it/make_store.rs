//! `narflow bench make-store` against real Nix 2.8: the generated store is valid, its
//! registered references are exactly the store paths written in the contents (and the
//! planned ones), ids follow the manifest's order except for the planned early paths, Nix
//! verifies a sample, and a second run reuses the store or remakes what is missing.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;

use narflow::bench::{StoreSpec, plan_store};
use narflow::format::store_path::StorePath;
use narflow::store::LocalStore;

use crate::helpers;

const STORE: &str = "/nix/store";
const DB: &str = "/nix/var/nix/db/db.sqlite";

/// Deletes the generated paths when dropped (best effort: it only saves space).
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            let _ = Command::new("nix-store")
                .arg("--delete")
                .args(&self.0)
                .output();
        }
    }
}

/// Runs make-store; returns (stdout's manifest path, stderr).
fn make_store(spec: &StoreSpec, dir: &Path) -> (String, String) {
    let out = helpers::run(
        helpers::narflow()
            .args(["bench", "make-store", "--tag", &spec.tag])
            .args(["--paths", &spec.paths.to_string()])
            .args(["--refs", &spec.refs.to_string()])
            .args(["--disorder", &spec.disorder_permille.to_string()])
            .arg("--manifest-dir")
            .arg(dir),
    );
    (
        String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The hash parts of `candidates` written anywhere in the tree at `root` after
/// `/nix/store/`: the references Nix's scanner would find among them.
fn mentioned_hash_parts(root: &Path, candidates: &HashSet<&str>, found: &mut HashSet<String>) {
    let meta = std::fs::symlink_metadata(root).unwrap();
    let bytes = if meta.is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            mentioned_hash_parts(&e.unwrap().path(), candidates, found);
        }
        return;
    } else if meta.is_symlink() {
        use std::os::unix::ffi::OsStrExt;
        std::fs::read_link(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec()
    } else {
        std::fs::read(root).unwrap()
    };
    let needle = b"/nix/store/";
    let mut at = 0;
    while let Some(i) = bytes[at..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + at)
    {
        let start = i + needle.len();
        if let Some(h) = bytes
            .get(start..start + 32)
            .and_then(|h| std::str::from_utf8(h).ok())
            && candidates.contains(h)
        {
            found.insert(h.to_owned());
        }
        at = start;
    }
}

fn ids(store: &LocalStore, after: i64, ours: &HashSet<&str>) -> HashMap<String, i64> {
    store
        .valid_after(after, 10_000_000)
        .unwrap()
        .into_iter()
        .map(|row| (row.path.to_absolute(STORE), row.id))
        .filter(|(p, _)| ours.contains(p.as_str()))
        .collect()
}

#[test]
fn make_store_registers_the_planned_store_and_reuses_it() {
    // Over one batch (1,000 paths), so references also cross `--register-validity` calls.
    let spec = StoreSpec {
        tag: helpers::unique("it"),
        paths: 1100,
        refs: 3,
        disorder_permille: 10,
        tiny: false,
    };
    let dir = helpers::tempdir();
    let store = LocalStore::open(STORE, Path::new(DB));
    let before = store.last_valid_id().unwrap();

    let (manifest, err) = make_store(&spec, dir.path());
    let paths: Vec<String> = std::fs::read_to_string(&manifest)
        .unwrap_or_else(|e| panic!("manifest {manifest:?} ({err}): {e}"))
        .lines()
        .map(str::to_owned)
        .collect();
    let _cleanup = Cleanup(paths.clone());
    assert_eq!(
        manifest,
        dir.path()
            .join(format!("{}-1100.paths", spec.tag))
            .to_str()
            .unwrap()
    );
    assert_eq!(paths.len(), 1100, "{err}");
    assert!(err.contains("1100 paths made and registered"), "{err}");
    helpers::run(
        Command::new("nix-store")
            .arg("--check-validity")
            .args(&paths),
    );

    // The manifest's order is the registration order (ids), but for the planned paths,
    // each registered just before its reference.
    let ours: HashSet<&str> = paths.iter().map(String::as_str).collect();
    let id = ids(&store, before, &ours);
    assert_eq!(id.len(), paths.len(), "every path registered by this run");
    let plan = plan_store(&spec);
    let sps: Vec<StorePath> = paths
        .iter()
        .map(|p| StorePath::from_absolute_path(p, STORE).unwrap())
        .collect();
    let infos = store.path_infos(&sps).unwrap();
    let hash_parts: HashSet<&str> = sps.iter().map(StorePath::hash_part).collect();
    let mut early = 0;
    for (k, info) in infos.iter().enumerate() {
        let full = &paths[k];
        if k > 0 {
            assert!(
                id[full] > id[&paths[k - 1]],
                "{full} registered out of order"
            );
        }
        let planned = plan
            .paths
            .iter()
            .find(|p| p.path == info.path)
            .expect("a planned path");
        assert_eq!(info.references, planned.references, "{full}");
        let registered: HashSet<String> = info
            .references
            .iter()
            .map(|r| r.hash_part().to_owned())
            .collect();
        let mut written = HashSet::new();
        mentioned_hash_parts(Path::new(full), &hash_parts, &mut written);
        assert_eq!(registered, written, "{full}: references vs. contents");
        early += usize::from(
            info.references
                .iter()
                .any(|r| id[&r.to_absolute(STORE)] > id[full]),
        );
    }
    assert_eq!(early, 11, "1,100 paths at 10 per thousand");
    assert_eq!(plan.disordered.len(), 11);

    for p in paths.iter().step_by(97) {
        helpers::run(Command::new("nix-store").arg("--verify-path").arg(p));
    }

    // Again: reused, nothing registered.
    let (again, err) = make_store(&spec, dir.path());
    assert_eq!(again, manifest);
    assert!(
        err.contains("1100 paths valid from an earlier run"),
        "{err}"
    );
    assert_eq!(ids(&store, before, &ours), id, "nothing registered again");

    // A path gone (one no other path refers to): made again, the rest left as they are.
    let referenced: HashSet<&StorePath> = infos
        .iter()
        .flat_map(|i| i.references.iter().filter(move |r| **r != i.path))
        .collect();
    let gone = infos
        .iter()
        .rev()
        .find(|i| !referenced.contains(&i.path))
        .unwrap()
        .path
        .to_absolute(STORE);
    helpers::run(Command::new("nix-store").arg("--delete").arg(&gone));
    assert!(!Path::new(&gone).exists());
    let (again, err) = make_store(&spec, dir.path());
    assert_eq!(again, manifest);
    assert!(
        err.contains("1 paths made and registered, 1099 valid already"),
        "{err}"
    );
    helpers::run(
        Command::new("nix-store")
            .arg("--check-validity")
            .args(&paths),
    );
    helpers::run(Command::new("nix-store").arg("--verify-path").arg(&gone));
    let now = ids(&store, before, &ours);
    for p in &paths {
        if *p != gone {
            assert_eq!(now[p], id[p], "{p} registered again");
        }
    }
}

#[test]
fn make_store_refuses_bad_parameters_by_name() {
    let out = helpers::narflow()
        .args(["bench", "make-store", "--tag", "no/slash", "--paths", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tag \"no/slash\""), "{err}");
}
