//! A signed push over a bucket it has written to before: a listing shows each narinfo's
//! ETag, and a narinfo listed with the ETag this machine recorded when it wrote it (with
//! the same keys) is not read. Anything else is read as without the record: a narinfo
//! another writer rewrote, one deleted (absent: uploaded again), a push with other keys.
//! These tests list the gc bucket (a listing of the shared bucket, which every test and
//! run fills, could take more pages than a push lists before it asks path by path), one
//! at a time with the gc tests, which empty it.
use crate::gc::{S3_GC, gc, open, s3_gc_bucket};
use crate::helpers::*;
use crate::proxy::{Kind, Proxy};
use narflow::format::narinfo::NarInfo;
use narflow::format::signing::{SigningKey, VerifyingKey};
use std::process::Output;

/// Paths pushed: at least as many as make a push list the bucket instead of asking path
/// by path (`LIST_THRESHOLD`, 512).
const PATHS: usize = 520;

/// `PATHS` new store paths of a few bytes each, added to the store with one
/// `nix-store --add`.
fn many_paths(tag: &str) -> Vec<String> {
    let dir = tempdir();
    let seed = unique(tag);
    let files: Vec<std::path::PathBuf> = (0..PATHS)
        .map(|i| {
            let f = dir.path().join(format!("{tag}-{i}"));
            std::fs::write(&f, format!("{seed} {i}\n")).unwrap();
            f
        })
        .collect();
    let out = run(std::process::Command::new("nix-store")
        .arg("--add")
        .args(&files));
    let paths: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(paths.len(), PATHS);
    paths
}

fn push(url: &str, keys: &[&NixKey], paths: &[String]) -> serde_json::Value {
    let mut cmd = narflow();
    cmd.args(["push", "--json", "--to", url]);
    for k in keys {
        cmd.arg("--key-file").arg(&k.secret);
    }
    let out: Output = cmd.args(paths).output().unwrap();
    assert!(
        out.status.success(),
        "narflow push: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (uploaded, already present, failed) of a push's summary.
fn counts(s: &serde_json::Value) -> (u64, u64, u64) {
    (
        s["uploaded"].as_u64().unwrap(),
        s["already_present"].as_u64().unwrap(),
        s["failed"].as_u64().unwrap(),
    )
}

/// The narinfo GETs the proxy forwarded after its first `from` requests, by key.
fn narinfo_gets(proxy: &Proxy, from: usize) -> Vec<String> {
    proxy.log()[from..]
        .iter()
        .filter(|r| r.is(Kind::Get) && r.key().ends_with(".narinfo"))
        .map(|r| r.key().to_owned())
        .collect()
}

/// The PUTs the proxy forwarded after its first `from` requests.
fn puts(proxy: &Proxy, from: usize) -> usize {
    proxy.log()[from..]
        .iter()
        .filter(|r| r.is(Kind::Put))
        .count()
}

/// The gc bucket emptied (through `url`), with `PATHS` new paths pushed to it through
/// `via` signed by `key`.
fn pushed(url: &str, via: &str, tag: &str, key: &NixKey) -> Vec<String> {
    let empty = tempdir();
    let none = empty.path().join("keep");
    std::fs::write(&none, "").unwrap();
    let (code, _, err) = gc(
        url,
        &["--keep-file", none.to_str().unwrap(), "--grace", "0"],
    );
    assert_eq!(code, 0, "{err}");
    let paths = many_paths(tag);
    assert_eq!(counts(&push(via, &[key], &paths)), (PATHS as u64, 0, 0));
    paths
}

/// A signed push again reads no narinfo; after another writer rewrote one (dropping our
/// signature) and another was deleted, the next push reads the rewritten one alone (and
/// signs it again) and uploads the deleted one again.
#[test]
fn a_signed_push_again_reads_only_the_narinfos_changed_since_it_wrote_them() {
    let Some((env, url)) = s3_gc_bucket() else {
        return;
    };
    let _one = S3_GC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // One endpoint for every push: the record is of the bucket at that endpoint.
    let proxy = Proxy::start(&env.endpoint, vec![]);
    let via = env.url_at(&proxy.endpoint(), "");
    let key = nix_generate_key("narflow-known-1");
    let paths = pushed(&url, &via, "known", &key);

    let from = proxy.log().len();
    assert_eq!(counts(&push(&via, &[&key], &paths)), (0, PATHS as u64, 0));
    assert_eq!(
        narinfo_gets(&proxy, from),
        Vec::<String>::new(),
        "{}",
        proxy.dump()
    );
    assert_eq!(puts(&proxy, from), 0, "{}", proxy.dump());

    // Another writer rewrites one narinfo with its own signature instead of ours, and
    // another narinfo is deleted.
    let cache = open(&url);
    let (rewritten, deleted) = (&paths[3], &paths[4]);
    let theirs = nix_generate_key("someone-else-1");
    let text = cache
        .get_text(&narinfo_key(rewritten))
        .unwrap()
        .expect("pushed");
    let mut n = NarInfo::parse(&text, "/nix/store").unwrap();
    n.sigs.clear();
    let theirs_secret = std::fs::read_to_string(&theirs.secret).unwrap();
    n.sign(&SigningKey::parse(&theirs_secret).unwrap(), "/nix/store");
    cache
        .put_object(
            &narinfo_key(rewritten),
            n.render("/nix/store").as_bytes(),
            "text/x-nix-narinfo",
        )
        .unwrap();
    let left = cache.delete_objects(&[narinfo_key(deleted)]).unwrap();
    assert!(left.is_empty(), "{left:?}");

    let from = proxy.log().len();
    assert_eq!(
        counts(&push(&via, &[&key], &paths)),
        (1, PATHS as u64 - 1, 0)
    );
    let gets = narinfo_gets(&proxy, from);
    // The look reads the rewritten one; signing it and publishing the deleted one read
    // each again (the merge) right before writing.
    let changed = [narinfo_key(rewritten), narinfo_key(deleted)];
    assert!(gets.iter().all(|k| changed.contains(k)), "{gets:?}");
    assert!(gets.contains(&changed[0]), "{gets:?}");
    let ours = VerifyingKey::parse(&key.public).unwrap();
    let other = VerifyingKey::parse(&theirs.public).unwrap();
    let text = cache.get_text(&changed[0]).unwrap().unwrap();
    let n = NarInfo::parse(&text, "/nix/store").unwrap();
    assert_eq!(
        n.valid_signatures("/nix/store", &[ours.clone(), other]),
        2,
        "{text}"
    );
    let text = cache.get_text(&changed[1]).unwrap().unwrap();
    let n = NarInfo::parse(&text, "/nix/store").unwrap();
    assert_eq!(n.valid_signatures("/nix/store", &[ours]), 1, "{text}");
}

/// A push with another key reads every narinfo it finds (the record says which keys
/// signed each), and gives each the new key's signature; the next push with the same two
/// keys reads none.
#[test]
fn a_push_with_another_key_reads_every_narinfo() {
    let Some((env, url)) = s3_gc_bucket() else {
        return;
    };
    let _one = S3_GC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let proxy = Proxy::start(&env.endpoint, vec![]);
    let via = env.url_at(&proxy.endpoint(), "");
    let key = nix_generate_key("narflow-known-2");
    let paths = pushed(&url, &via, "known-other", &key);

    let other = nix_generate_key("narflow-known-3");
    let from = proxy.log().len();
    // Each path is present, or (its signature not added in time: narinfos are signed
    // within a gc wave's time) uploaded again; none fails.
    let (uploaded, present, failed) = counts(&push(&via, &[&key, &other], &paths));
    assert_eq!((uploaded + present, failed), (PATHS as u64, 0));
    let mut gets = narinfo_gets(&proxy, from);
    gets.sort();
    gets.dedup();
    assert_eq!(gets.len(), PATHS, "{}", proxy.dump());

    let from = proxy.log().len();
    assert_eq!(
        counts(&push(&via, &[&other, &key], &paths)),
        (0, PATHS as u64, 0)
    );
    assert_eq!(
        narinfo_gets(&proxy, from),
        Vec::<String>::new(),
        "{}",
        proxy.dump()
    );
}
