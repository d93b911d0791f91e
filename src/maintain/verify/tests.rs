//! The checker against an in-memory cache: a clean one, then each kind of damage named.
use super::*;
use crate::cache::{NarUpload, UnfinishedUpload};
use crate::format::hash::Sha256;
use crate::format::signing::SigningKey;
use std::collections::BTreeMap;

const SD: &str = "/nix/store";

/// A cache that is a map of keys to bytes, with a list of unfinished uploads.
#[derive(Debug, Default)]
struct Memory {
    objects: BTreeMap<String, Vec<u8>>,
    uploads: Vec<UnfinishedUpload>,
}

impl BinaryCache for Memory {
    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        Ok(self
            .objects
            .get(key)
            .map(|b| String::from_utf8_lossy(b).into_owned()))
    }
    fn url(&self) -> &str {
        "memory://"
    }
    fn ensure_cache_info(&self, _: &str) -> Result<(), CacheError> {
        unreachable!("verify never writes")
    }
    fn has_narinfo(&self, _: &StorePath) -> Result<bool, CacheError> {
        unreachable!("verify reads the listing")
    }
    fn has_object(&self, _: &str) -> Result<bool, CacheError> {
        unreachable!("verify reads the listing")
    }
    fn object_size(&self, _: &str) -> Result<Option<u64>, CacheError> {
        unreachable!("verify reads the listing")
    }
    fn get_narinfo(&self, _: &StorePath) -> Result<Option<String>, CacheError> {
        unreachable!("verify reads by key")
    }
    fn begin_nar(&self, _: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        unreachable!("verify never writes")
    }
    fn put_narinfo(&self, _: &StorePath, _: &str) -> Result<(), CacheError> {
        unreachable!("verify never writes")
    }
    fn sync(&self) -> Result<(), CacheError> {
        unreachable!("verify never writes")
    }
    fn list_objects(&self, visit: &mut dyn FnMut(ObjectInfo<'_>)) -> Result<bool, CacheError> {
        for (key, bytes) in &self.objects {
            visit(ObjectInfo {
                key,
                size: bytes.len() as u64,
                modified: None,
            });
        }
        Ok(true)
    }
    fn list_unfinished_uploads(&self) -> Result<Vec<UnfinishedUpload>, CacheError> {
        Ok(self.uploads.clone())
    }
    fn read_object(&self, key: &str) -> Result<Option<Box<dyn std::io::Read + Send>>, CacheError> {
        if key.ends_with(".unreadable") {
            return Err(CacheError::Config(format!("{key}: refused")));
        }
        Ok(self
            .objects
            .get(key)
            .map(|b| Box::new(std::io::Cursor::new(b.clone())) as Box<dyn std::io::Read + Send>))
    }
}

fn path(c: char, name: &str) -> StorePath {
    StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).unwrap()
}

fn key() -> SigningKey {
    SigningKey::from_seed("cache-1", [7; 32])
}

/// Adds `p`'s NAR and narinfo (signed by `by`), referring to `refs`.
fn add(cache: &mut Memory, p: &StorePath, refs: &[&StorePath], by: &SigningKey) -> NarInfo {
    let nar = format!("nar of {}", p.base_name()).into_bytes();
    let file_hash = Sha256::digest(&nar);
    let url = format!("nar/{}.nar", file_hash.to_nix32());
    let mut references: Vec<StorePath> = refs.iter().map(|r| (*r).clone()).collect();
    references.sort();
    let mut n = NarInfo {
        store_path: p.clone(),
        url: url.clone(),
        compression: "none".into(),
        file_hash: Some(file_hash),
        file_size: Some(nar.len() as u64),
        nar_hash: file_hash,
        nar_size: nar.len() as u64,
        references,
        deriver: None,
        sigs: vec![],
        ca: None,
    };
    n.sign(by, SD);
    cache.objects.insert(url, nar);
    cache
        .objects
        .insert(narinfo_key(p), n.render(SD).into_bytes());
    n
}

fn narinfo_key(p: &StorePath) -> String {
    crate::cache::narinfo_key(p)
}

/// A closure of three: top → mid → leaf.
fn closure() -> (Memory, [StorePath; 3]) {
    let mut c = Memory::default();
    let (top, mid, leaf) = (path('a', "top"), path('b', "mid"), path('c', "leaf"));
    let k = key();
    add(&mut c, &leaf, &[], &k);
    add(&mut c, &mid, &[&leaf], &k);
    add(&mut c, &top, &[&mid, &top], &k);
    c.objects
        .insert("nix-cache-info".into(), b"StoreDir: /nix/store\n".to_vec());
    (c, [top, mid, leaf])
}

fn opts(paths: Option<Vec<StorePath>>) -> VerifyOptions {
    VerifyOptions {
        contents: None,
        store_dir: SD.into(),
        trusted: vec![key().verifying_key()],
        paths,
    }
}

fn run(c: &Memory, paths: Option<Vec<StorePath>>) -> (Summary, Vec<Problem>) {
    let mut problems = Vec::new();
    let s = verify(c, &opts(paths), &mut |p| problems.push(p)).unwrap();
    (s, problems)
}

/// The one problem a damaged cache has: its kind and object.
fn only_problem(c: &Memory) -> (Kind, String) {
    let (s, problems) = run(c, None);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(s.total_problems(), 1);
    assert_eq!(s.count(problems[0].kind), 1);
    (problems[0].kind, problems[0].object.clone())
}

#[test]
fn a_whole_closure_verifies_clean() {
    let (c, _) = closure();
    let (s, problems) = run(&c, None);
    assert_eq!(problems, vec![]);
    assert_eq!((s.narinfos, s.nars, s.total_problems()), (3, 3, 0));
}

#[test]
fn each_damage_is_named_with_its_kind_and_object() {
    let (c0, [top, mid, leaf]) = closure();
    let nar_of = |c: &Memory, p: &StorePath| {
        let n = NarInfo::parse(
            std::str::from_utf8(&c.objects[&narinfo_key(p)]).unwrap(),
            SD,
        )
        .unwrap();
        n.url
    };

    let mut c = Memory {
        objects: c0.objects.clone(),
        ..Default::default()
    };
    let url = nar_of(&c, &mid);
    c.objects.get_mut(&url).unwrap().pop();
    assert_eq!(only_problem(&c), (Kind::NarSize, narinfo_key(&mid)));

    let mut c = Memory {
        objects: c0.objects.clone(),
        ..Default::default()
    };
    c.objects.remove(&nar_of(&c, &top));
    assert_eq!(only_problem(&c), (Kind::NarMissing, narinfo_key(&top)));

    let mut c = Memory {
        objects: c0.objects.clone(),
        ..Default::default()
    };
    let orphan = nar_of(&c, &leaf);
    c.objects.remove(&narinfo_key(&leaf));
    let (_, problems) = run(&c, None);
    let kinds: Vec<(Kind, &str)> = problems.iter().map(|p| (p.kind, &*p.object)).collect();
    let mid_key = narinfo_key(&mid);
    assert_eq!(
        kinds,
        vec![
            (Kind::MissingReference, &*mid_key),
            (Kind::OrphanNar, &*orphan)
        ]
    );

    // A signature by the trusted key's name over other bytes.
    let mut c = Memory {
        objects: c0.objects.clone(),
        ..Default::default()
    };
    let text = String::from_utf8(c.objects[&narinfo_key(&leaf)].clone()).unwrap();
    let forged = SigningKey::from_seed("cache-1", [9; 32]);
    let mut n = NarInfo::parse(&text, SD).unwrap();
    n.sigs.clear();
    n.sign(&forged, SD);
    c.objects
        .insert(narinfo_key(&leaf), n.render(SD).into_bytes());
    assert_eq!(only_problem(&c), (Kind::BadSignature, narinfo_key(&leaf)));

    let mut c = Memory {
        objects: c0.objects.clone(),
        ..Default::default()
    };
    n.sigs.clear();
    n.sign(&SigningKey::from_seed("other-1", [3; 32]), SD);
    c.objects
        .insert(narinfo_key(&leaf), n.render(SD).into_bytes());
    assert_eq!(only_problem(&c), (Kind::Untrusted, narinfo_key(&leaf)));

    let mut c = Memory {
        objects: c0.objects.clone(),
        ..Default::default()
    };
    c.objects
        .insert(narinfo_key(&leaf), b"StorePath: nonsense\n".to_vec());
    let (_, problems) = run(&c, None);
    assert_eq!(problems[0].kind, Kind::Unparsable);
    assert_eq!(problems[0].object, narinfo_key(&leaf));
    // Its NAR is now named by nothing that parses.
    assert_eq!(problems[1].kind, Kind::OrphanNar);

    let mut c = Memory {
        objects: c0.objects.clone(),
        ..Default::default()
    };
    let misplaced = path('d', "leaf");
    let text = c.objects[&narinfo_key(&leaf)].clone();
    c.objects.insert(narinfo_key(&misplaced), text);
    assert_eq!(
        only_problem(&c),
        (Kind::WrongStorePath, narinfo_key(&misplaced))
    );

    for stray in [
        ".narflow-tmp-abc",
        "nar/.narflow-tmp-def",
        ".narflow-staging/nar/x.nar.zst",
    ] {
        let mut c = Memory {
            objects: c0.objects.clone(),
            ..Default::default()
        };
        c.objects.insert(stray.into(), b"partial".to_vec());
        assert_eq!(
            only_problem(&c),
            (Kind::Leftover, stray.to_owned()),
            "{stray}"
        );
    }

    let mut c = Memory {
        objects: c0.objects.clone(),
        ..Default::default()
    };
    c.uploads.push(UnfinishedUpload {
        key: ".narflow-staging/nar/y".into(),
        upload_id: "id-1".into(),
        initiated: None,
    });
    assert_eq!(
        only_problem(&c),
        (Kind::UnfinishedUpload, ".narflow-staging/nar/y".to_owned())
    );
}

#[test]
fn given_paths_are_verified_with_what_they_reach_and_nothing_else() {
    let (mut c, [_top, mid, leaf]) = closure();
    // Damage outside mid's closure, an orphan and leftovers: none is looked at.
    let other = path('f', "other");
    add(
        &mut c,
        &other,
        &[],
        &SigningKey::from_seed("other-1", [3; 32]),
    );
    c.objects.insert("nar/orphan.nar".into(), b"x".to_vec());
    c.objects.insert(".narflow-tmp-x".into(), b"x".to_vec());
    c.uploads.push(UnfinishedUpload {
        key: ".narflow-staging/nar/y".into(),
        upload_id: "id-1".into(),
        initiated: None,
    });
    let (s, problems) = run(&c, Some(vec![mid.clone()]));
    assert_eq!(problems, vec![]);
    assert_eq!(s.narinfos, 2);

    // Damage inside it is; a path without a narinfo is named.
    c.objects.remove(&narinfo_key(&leaf));
    let absent = path('g', "absent");
    let (_, problems) = run(&c, Some(vec![mid.clone(), absent.clone()]));
    let kinds: Vec<Kind> = problems.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, vec![Kind::MissingNarinfo, Kind::MissingReference]);
    assert_eq!(problems[0].object, absent.to_absolute(SD));
}

#[test]
fn a_cache_that_cannot_list_is_a_configuration_error() {
    #[derive(Debug)]
    struct Unlisted(Memory);
    impl BinaryCache for Unlisted {
        fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
            self.0.get_text(key)
        }
        fn url(&self) -> &str {
            self.0.url()
        }
        fn ensure_cache_info(&self, s: &str) -> Result<(), CacheError> {
            self.0.ensure_cache_info(s)
        }
        fn has_narinfo(&self, p: &StorePath) -> Result<bool, CacheError> {
            self.0.has_narinfo(p)
        }
        fn has_object(&self, k: &str) -> Result<bool, CacheError> {
            self.0.has_object(k)
        }
        fn object_size(&self, k: &str) -> Result<Option<u64>, CacheError> {
            self.0.object_size(k)
        }
        fn get_narinfo(&self, p: &StorePath) -> Result<Option<String>, CacheError> {
            self.0.get_narinfo(p)
        }
        fn begin_nar(&self, n: u64) -> Result<Box<dyn NarUpload>, CacheError> {
            self.0.begin_nar(n)
        }
        fn put_narinfo(&self, p: &StorePath, t: &str) -> Result<(), CacheError> {
            self.0.put_narinfo(p, t)
        }
        fn sync(&self) -> Result<(), CacheError> {
            self.0.sync()
        }
    }
    let r = verify(&Unlisted(Memory::default()), &opts(None), &mut |_| {});
    assert!(matches!(r, Err(CacheError::Config(_))), "{r:?}");
}

#[test]
fn orphan_nars_are_named_by_their_keys_whatever_their_shape() {
    let (mut c, _) = closure();
    let hashed = format!("nar/{}.nar.zst", Sha256::digest(b"orphan").to_nix32());
    let odd = [
        hashed.as_str(),
        "nar/not-a-hash.nar",
        "nar/0000000000000000000000000000000000000000000000000zzz.nar",
    ];
    for key in odd {
        c.objects.insert(key.into(), b"x".to_vec());
    }
    let (s, problems) = run(&c, None);
    let mut named: Vec<&str> = problems.iter().map(|p| &*p.object).collect();
    named.sort_unstable();
    let mut want = odd.to_vec();
    want.sort_unstable();
    assert_eq!(named, want);
    assert_eq!(s.count(Kind::OrphanNar), 3);
    assert_eq!(s.total_problems(), 3);
}

#[test]
fn kinds_are_counted_in_their_own_slots_under_distinct_names() {
    for (i, k) in Kind::ALL.iter().enumerate() {
        assert_eq!(*k as usize, i, "{k}");
    }
    let mut names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Kind::ALL.len());
}

#[test]
fn contents_are_read_by_every_reader_and_damage_inside_a_nar_is_named() {
    // More paths than the queues hold, so the submitting thread waits on the readers.
    let mut c = Memory::default();
    let k = key();
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let paths: Vec<StorePath> = (0..40)
        .map(|i| {
            let (a, b) = (NIX32[i / 32] as char, NIX32[i % 32] as char);
            StorePath::from_base_name(&format!("{}{a}{b}-p{i}", "d".repeat(30))).unwrap()
        })
        .collect();
    for p in &paths {
        add(&mut c, p, &[], &k);
    }
    let contents = |c: &Memory, readers| {
        let mut problems = Vec::new();
        let o = VerifyOptions {
            contents: Some(readers),
            ..opts(None)
        };
        let s = verify(c, &o, &mut |p| problems.push(p)).unwrap();
        (s, problems)
    };
    for readers in [1, 3] {
        let (s, problems) = contents(&c, readers);
        assert_eq!(problems, vec![]);
        assert_eq!((s.narinfos, s.nars_read), (40, 40));
        assert_eq!(s.file_bytes_read, s.nar_bytes);
    }

    // A flipped byte keeps the NAR's size: only reading it finds it.
    let victim = &paths[17];
    let text = String::from_utf8(c.objects[&narinfo_key(victim)].clone()).unwrap();
    let url = NarInfo::parse(&text, SD).unwrap().url;
    c.objects.get_mut(&url).unwrap()[3] ^= 1;
    assert_eq!(run(&c, None).1, vec![]);
    let (s, problems) = contents(&c, 3);
    let named: Vec<(Kind, &str)> = problems.iter().map(|p| (p.kind, &*p.object)).collect();
    assert_eq!(named, [(Kind::FileHash, &*narinfo_key(victim))]);
    assert_eq!(s.count(Kind::FileHash), 1);
}

#[test]
fn a_nar_that_cannot_be_read_fails_the_run() {
    let (mut c, [_, mid, _]) = closure();
    // mid's narinfo names a NAR the cache refuses to read.
    let key_of = narinfo_key(&mid);
    let mut n = NarInfo::parse(std::str::from_utf8(&c.objects[&key_of]).unwrap(), SD).unwrap();
    let bytes = c.objects.remove(&n.url).unwrap();
    n.url = format!("{}.unreadable", n.url);
    c.objects.insert(n.url.clone(), bytes);
    c.objects.insert(key_of, n.render(SD).into_bytes());
    let o = VerifyOptions {
        contents: Some(2),
        ..opts(None)
    };
    let e = verify(&c, &o, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
}
