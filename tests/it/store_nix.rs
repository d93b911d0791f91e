//! The local store against real Nix 2.8: the database reader and the `nix path-info`
//! fallback must agree with each other and with Nix's own answers.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

use narflow::format::store_path::StorePath;
use narflow::store::path_info_cmd::PathInfoCommand;
use narflow::store::{LocalStore, PathInfo, StoreError};

use crate::helpers;

const STORE: &str = "/nix/store";
const DB: &str = "/nix/var/nix/db/db.sqlite";

fn sp(full: &str) -> StorePath {
    StorePath::from_absolute_path(full, STORE).unwrap()
}

fn db_store() -> LocalStore {
    let store = LocalStore::open(STORE, Path::new(DB));
    assert!(
        matches!(store, LocalStore::Db(_)),
        "expected to read {DB} directly, got {store:?}"
    );
    store
}

/// Builds a fresh chain `a <- b <- c` (c also refers to a) and returns c's output path.
/// Names are unique, so every run registers new paths.
fn build_chain() -> String {
    let tag = helpers::unique("store");
    let out = helpers::nix_build(&format!(
        r#"let
  mk = name: script: derivation {{
    inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ];
  }};
  a = mk "a-{tag}" "echo a > $out";
  b = mk "b-{tag}" "echo ${{a}} > $out";
  c = mk "c-{tag}" "echo ${{b}} ${{a}} > $out";
in c
"#
    ));
    out.into_iter().next().expect("one output")
}

/// `nix path-info --json` for `paths`, by path.
fn nix_path_info(paths: &[String]) -> HashMap<String, serde_json::Value> {
    let json = helpers::nix_path_info(None, paths);
    json.as_array()
        .expect("array")
        .iter()
        .map(|v| (v["path"].as_str().unwrap().to_owned(), v.clone()))
        .collect()
}

fn assert_topological(infos: &[PathInfo]) {
    let position: HashMap<&StorePath, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.path, i))
        .collect();
    assert_eq!(position.len(), infos.len(), "no duplicates");
    for (i, info) in infos.iter().enumerate() {
        for r in &info.references {
            if let Some(&j) = position.get(r) {
                assert!(j <= i, "{} comes before its reference {r}", info.path);
            }
        }
    }
}

#[test]
fn closure_matches_nix_store_and_path_info() {
    let c = build_chain();
    let store = db_store();
    let closure = store.closure(&[sp(&c)]).unwrap();
    assert_topological(&closure);

    let expected: BTreeSet<String> = helpers::stdout(Command::new("nix-store").args(["-qR", &c]))
        .lines()
        .map(str::to_owned)
        .collect();
    let got: BTreeSet<String> = closure.iter().map(|i| i.path.to_absolute(STORE)).collect();
    assert_eq!(got, expected);
    assert_eq!(closure.len(), 3);
    assert_eq!(
        closure[2].path,
        sp(&c),
        "c refers to both others, so it is last"
    );

    let paths: Vec<String> = expected.into_iter().collect();
    let nix = nix_path_info(&paths);
    for info in &closure {
        let full = info.path.to_absolute(STORE);
        let j = &nix[&full];
        assert_eq!(
            info.nar_hash.to_sri(),
            j["narHash"].as_str().unwrap(),
            "{full}"
        );
        assert_eq!(info.nar_size, j["narSize"].as_u64().unwrap(), "{full}");
        let mut refs: Vec<&str> = j["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        refs.sort();
        let ours: Vec<String> = info
            .references
            .iter()
            .map(|r| r.to_absolute(STORE))
            .collect();
        assert_eq!(ours, refs, "{full}");
        let deriver = info.deriver.as_ref().map(|d| d.to_absolute(STORE));
        assert_eq!(deriver.as_deref(), j["deriver"].as_str(), "{full}");
        assert!(deriver.unwrap().ends_with(".drv"));
        assert_eq!(info.ca.as_deref(), j["ca"].as_str(), "{full}");
        assert_eq!(
            info.sigs.len(),
            j["signatures"].as_array().map_or(0, Vec::len)
        );
    }
}

/// Pins the fallback to the database: both must give identical answers, `.drv` paths
/// included (Nix 2.8 reads a `.drv` argument as its outputs unless told otherwise).
#[test]
fn command_fallback_agrees_with_the_database() {
    let c = build_chain();
    let store = db_store();
    let mut paths: Vec<StorePath> = store
        .closure(&[sp(&c)])
        .unwrap()
        .into_iter()
        .map(|i| i.path)
        .collect();
    let drvs: Vec<StorePath> = store
        .path_infos(&paths)
        .unwrap()
        .into_iter()
        .filter_map(|i| i.deriver)
        .collect();
    paths.extend(drvs);
    paths.reverse();
    paths.push(paths[0].clone());

    let from_db = store.path_infos(&paths).unwrap();
    let command = PathInfoCommand::new(STORE);
    assert_eq!(command.path_infos(&paths).unwrap(), from_db);
    assert!(from_db.iter().any(|i| i.path.name().ends_with(".drv")));

    let fallback = LocalStore::Command(PathInfoCommand::new(STORE));
    assert_eq!(
        fallback.closure(&[sp(&c)]).unwrap(),
        store.closure(&[sp(&c)]).unwrap()
    );
}

#[test]
fn missing_paths_are_not_valid_in_both() {
    let c = build_chain();
    // A hash part no real path has; 32 nix32 characters from a unique string.
    let tag = helpers::unique("gone").replace(|ch: char| !ch.is_ascii_digit(), "");
    let hash: String = format!("{tag:0>32}").chars().rev().take(32).collect();
    let missing = format!("{STORE}/{hash}-narflow-missing");
    let missing_drv = format!("{STORE}/{hash}-narflow-missing.drv");
    let stores = [db_store(), LocalStore::Command(PathInfoCommand::new(STORE))];
    for store in &stores {
        for gone in [&missing, &missing_drv] {
            for paths in [vec![sp(gone)], vec![sp(&c), sp(gone)]] {
                match store.path_infos(&paths) {
                    Err(StoreError::NotValid(p)) => assert_eq!(&p, gone, "{store:?}"),
                    r => panic!("{store:?} {gone}: {r:?}"),
                }
            }
            match store.closure(&[sp(&c), sp(gone)]) {
                Err(StoreError::NotValid(p)) => assert_eq!(&p, gone),
                r => panic!("{store:?} {gone}: {r:?}"),
            }
        }
    }
}
