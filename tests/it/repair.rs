//! `narflow verify --repair` against a closure real Nix built and narflow pushed, into
//! `file://` and the suite's S3 server: each kind of damage, one at a time and all
//! together, is named by `verify --contents` (exit 1), mended from the local store, and
//! then the cache verifies clean and real Nix substitutes it with signatures required.
//! What the store no longer has is reported, and deleted referrers first only with
//! `--delete-unrepairable`.
//!
//! The S3 bucket is shared by every test: there the closure is verified and repaired by
//! path (which looks at and touches nothing outside it).
use crate::helpers::*;
use crate::verify::Objects;
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::SigningKey;
use std::collections::BTreeMap;
use std::process::Command;

const STORE_DIR: &str = "/nix/store";

/// Problems by kind: the objects named, sorted.
type Found = BTreeMap<String, Vec<String>>;

fn problems(json: &serde_json::Value) -> Found {
    let mut found = Found::new();
    for (kind, list) in json["problems"].as_object().unwrap() {
        let mut objects: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["object"].as_str().unwrap().to_owned())
            .collect();
        objects.sort();
        found.insert(kind.clone(), objects);
    }
    found
}

fn found(kinds: &[(&str, &str)]) -> Found {
    let mut f = Found::new();
    for (kind, object) in kinds {
        f.entry((*kind).to_owned())
            .or_default()
            .push((*object).to_owned());
    }
    f.values_mut().for_each(|v| v.sort());
    f
}

/// Runs `narflow verify --json --contents` with `args`; its exit code and JSON.
fn narflow_verify(url: &str, key: &NixKey, args: &[&str]) -> (i32, serde_json::Value) {
    let out = narflow()
        .args(["verify", "--json", "--contents", "--cache", url])
        .args(["--trusted-key", &key.public, "--key-file"])
        .arg(&key.secret)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), json)
}

fn verify(url: &str, key: &NixKey, scope: &[&str]) -> (i32, Found) {
    let (code, json) = narflow_verify(url, key, scope);
    (code, problems(&json))
}

/// `verify --repair` of `scope`: its exit code and JSON.
fn repair(url: &str, key: &NixKey, scope: &[&str], extra: &[&str]) -> (i32, serde_json::Value) {
    let args: Vec<&str> = ["--repair", "--grace", "0"]
        .iter()
        .chain(extra)
        .chain(scope)
        .copied()
        .collect();
    narflow_verify(url, key, &args)
}

/// A pushed chain and what its damage needs: the paths (bottom first), their narinfo
/// keys, texts and NAR keys.
struct Chain {
    paths: Vec<String>,
    keys: Vec<String>,
    texts: Vec<String>,
    nars: Vec<String>,
}

fn push_chain(tag: &str, n: usize, url: &str, key: &NixKey, objects: &Objects) -> Chain {
    let top = nix_build_chain(tag, n);
    run(narflow()
        .args(["push", "--to", url, "--key-file"])
        .arg(&key.secret)
        .arg(&top));
    // The chain's closure, bottom first: each path refers only to paths before it.
    let mut paths = nix_closure(&top);
    paths.sort_by_key(|p| {
        p.rsplit_once("chain-")
            .and_then(|(_, i)| i.parse::<usize>().ok())
    });
    assert_eq!(paths.len(), n);
    let keys: Vec<String> = paths.iter().map(|p| narinfo_key(p)).collect();
    let texts: Vec<String> = keys
        .iter()
        .map(|k| String::from_utf8(objects.get(k)).unwrap())
        .collect();
    let nars = texts
        .iter()
        .map(|t| narinfo_field(t, "URL").unwrap().to_owned())
        .collect();
    Chain {
        paths,
        keys,
        texts,
        nars,
    }
}

/// One damage: what it does to the cache, and what verify must name.
type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>, Vec<(&'a str, String)>);

fn damages<'a>(c: &'a Chain, objects: &'a Objects, other: &'a SigningKey) -> Vec<Damage<'a>> {
    vec![
        (
            "flipped byte",
            Box::new(move || {
                let mut b = objects.get(&c.nars[1]);
                let at = b.len() / 2;
                b[at] ^= 0x10;
                objects.put(&c.nars[1], &b);
            }),
            vec![("file-hash", c.keys[1].clone())],
        ),
        (
            "truncated NAR",
            Box::new(move || {
                let b = objects.get(&c.nars[2]);
                objects.put(&c.nars[2], &b[..b.len() - 3]);
            }),
            vec![("nar-size", c.keys[2].clone())],
        ),
        (
            "deleted NAR",
            Box::new(move || objects.delete(&c.nars[3])),
            vec![("nar-missing", c.keys[3].clone())],
        ),
        (
            "deleted reference",
            Box::new(move || objects.delete(&c.keys[0])),
            vec![("missing-reference", c.keys[1].clone())],
        ),
        (
            "bad signature",
            Box::new(move || {
                let sig = narflow_field(&c.texts[4], "Sig");
                let other_sig = narflow_field(&c.texts[5], "Sig");
                objects.put(&c.keys[4], c.texts[4].replace(&sig, &other_sig).as_bytes());
            }),
            vec![("bad-signature", c.keys[4].clone())],
        ),
        (
            "untrusted key",
            Box::new(move || {
                let mut n = NarInfo::parse(&c.texts[5], STORE_DIR).unwrap();
                n.sigs.clear();
                n.sign(other, STORE_DIR);
                objects.put(&c.keys[5], n.render(STORE_DIR).as_bytes());
            }),
            vec![("untrusted", c.keys[5].clone())],
        ),
    ]
}

fn narflow_field(text: &str, field: &str) -> String {
    narinfo_field(text, field).unwrap().to_owned()
}

/// Each damage alone, then all together: named, repaired, clean, substitutable.
fn damage_and_repair(url: &str, nix_url: &str, objects: &Objects, whole: bool) {
    let key = nix_generate_key(&unique("repair-a").replace('-', "")[..20]);
    let other = nix_generate_key(&unique("repair-b").replace('-', "")[..20]);
    let other = SigningKey::parse(&std::fs::read_to_string(&other.secret).unwrap()).unwrap();
    let c = push_chain("repair", 6, url, &key, objects);
    let top = c.paths[5].clone();
    let scope: Vec<&str> = if whole { vec!["--all"] } else { vec![&top] };
    let clean = |why: &str| assert_eq!(verify(url, &key, &scope), (0, Found::new()), "{why}");
    clean("pushed");

    let damages = damages(&c, objects, &other);
    for (what, damage, want) in &damages {
        damage();
        let mut want: Vec<(&str, &str)> = want.iter().map(|(k, o)| (*k, o.as_str())).collect();
        if whole && *what == "deleted reference" {
            want.push(("orphan-nar", &c.nars[0]));
        }
        assert_eq!(verify(url, &key, &scope), (1, found(&want)), "{what}");
        let (code, out) = repair(url, &key, &scope, &[]);
        assert_eq!(code, 0, "{what}: {out:#}");
        assert_eq!(problems(&out["before"]), found(&want), "{what}");
        assert_eq!(out["after"]["problem_count"], 0, "{what}: {out:#}");
        clean(what);
    }

    // All together, with a stray temporary file where the whole cache is looked at.
    for (_, damage, _) in &damages {
        damage();
    }
    let stray = format!("nar/.narflow-tmp-{}", unique("stray"));
    if whole {
        objects.put(&stray, b"half a NAR");
    }
    let (code, before) = verify(url, &key, &scope);
    assert_eq!(code, 1);
    let mut want: Vec<(String, String)> = damages
        .iter()
        .flat_map(|(_, _, w)| w.iter().map(|(k, o)| ((*k).to_owned(), o.clone())))
        .collect();
    if whole {
        want.push(("orphan-nar".into(), c.nars[0].clone()));
        want.push(("leftover".into(), stray.clone()));
    }
    let want: Vec<(&str, &str)> = want.iter().map(|(k, o)| (k.as_str(), o.as_str())).collect();
    assert_eq!(before, found(&want), "all together");
    let (code, out) = repair(url, &key, &scope, &[]);
    assert_eq!(code, 0, "all together: {out:#}");
    assert_eq!(out["after"]["problem_count"], 0, "{out:#}");
    if whole {
        assert!(!objects.exists(&stray));
    }
    clean("all repaired");
    assert_nix_substitutes(nix_url, &key, &c.paths);
}

#[test]
fn a_file_cache_is_repaired_from_the_store() {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().display());
    damage_and_repair(&url, &url, &Objects::Dir(dir.path().to_owned()), true);
}

#[test]
fn an_s3_cache_is_repaired_from_the_store() {
    let Some(s3) = s3_env() else { return };
    damage_and_repair(&s3.url(""), &s3.http_url, &Objects::S3(s3.client()), false);
}

/// A path the store no longer has cannot be mended: repair says so and deletes nothing;
/// with --delete-unrepairable its narinfo goes, after the narinfo that refers to it, and
/// their NARs with them; what remains is clean.
#[test]
fn what_the_store_lacks_is_reported_then_deleted_referrers_first_when_asked() {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().display());
    let objects = Objects::Dir(dir.path().to_owned());
    let key = nix_generate_key(&unique("repair-u").replace('-', "")[..20]);
    // Another closure that stays: the deletion must leave it alone.
    let kept = push_chain("repair-kept", 2, &url, &key, &objects);
    let gone = push_chain("repair-gone", 2, &url, &key, &objects);
    run(Command::new("nix-store")
        .arg("--delete")
        .args(gone.paths.iter().rev()));
    let mut b = objects.get(&gone.nars[0]);
    b[10] ^= 1;
    objects.put(&gone.nars[0], &b);

    let (code, out) = repair(&url, &key, &["--all"], &[]);
    assert_eq!(code, 1, "{out:#}");
    let unrepairable: Vec<&str> = out["repair"]["unrepairable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["object"].as_str().unwrap())
        .collect();
    assert_eq!(unrepairable, [gone.keys[0].as_str()], "{out:#}");
    let what = out["repair"]["unrepairable"][0]["what"].as_str().unwrap();
    assert!(
        what.contains("not in the local store") && what.contains("--delete-unrepairable"),
        "{what}"
    );
    assert_eq!(out["repair"]["deleted"], serde_json::json!([]), "{out:#}");
    assert_eq!(
        problems(&out["after"]),
        found(&[("file-hash", &gone.keys[0])])
    );

    let (code, out) = repair(&url, &key, &["--all"], &["--delete-unrepairable"]);
    assert_eq!(code, 0, "{out:#}");
    let deleted: Vec<&str> = out["repair"]["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let at = |k: &str| {
        deleted
            .iter()
            .position(|d| *d == k)
            .unwrap_or_else(|| panic!("{k} not deleted: {deleted:?}"))
    };
    assert!(
        at(&gone.keys[1]) < at(&gone.keys[0]),
        "referrer first: {deleted:?}"
    );
    assert!(
        at(&gone.keys[0]) < at(&gone.nars[0]),
        "NAR last: {deleted:?}"
    );
    at(&gone.nars[1]);
    for k in kept.keys.iter().chain(&kept.nars) {
        assert!(objects.exists(k), "{k} was kept");
    }
    assert_eq!(verify(&url, &key, &["--all"]), (0, Found::new()));
}

#[test]
fn repair_needs_a_key_to_sign_with() {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().display());
    let key = nix_generate_key("repair-nokey");
    let out = narflow()
        .args(["verify", "--repair", "--all", "--cache", &url])
        .args(["--trusted-key", &key.public])
        .env_remove("NARFLOW_KEY_FILE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--repair"), "{err}");
}

/// Repair deletes and writes as gc does: while another gc's marker beats, it is refused
/// (exit 2) and touches nothing.
#[test]
fn repair_is_refused_while_a_gc_runs() {
    let dir = tempdir();
    let url = format!("file://{}", dir.path().display());
    let key = nix_generate_key("repair-beside-gc");
    let marker = dir.path().join("narflow-gc");
    let stray = dir.path().join(".narflow-tmp-stray");
    std::fs::write(&stray, b"left behind").unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        // The other gc's heartbeat, faster than gc's own so the wait sees it soon.
        s.spawn(|| {
            let mut beat = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let text = format!("generation 00000000000000aa\nstate running\nbeat {beat}\n");
                std::fs::write(&marker, text).unwrap();
                beat += 1;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        let out = narflow()
            .args(["verify", "--json", "--repair", "--grace", "0", "--all"])
            .args(["--cache", &url, "--trusted-key", &key.public, "--key-file"])
            .arg(&key.secret)
            .output()
            .unwrap();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        out
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("another gc is running"), "{err}");
    assert!(stray.exists(), "nothing is swept while a gc runs");
}
