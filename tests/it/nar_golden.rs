//! Golden NAR tests against real Nix: for trees with tricky content added with
//! `nix-store --add`, `dump_path` of the store path must be byte-identical to
//! `nix-store --dump`, and the reader must accept Nix's NAR and write it back unchanged.

use crate::helpers::{nix_store_add, nix_store_dump, run, tempdir, unique};
use narflow::format::nar::Node;
use narflow::format::nar::reader::{self, NarVisitor};
use narflow::nar_fs as writer;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

fn file(contents: &[u8]) -> Node {
    Node::Regular {
        executable: false,
        contents: contents.to_vec(),
    }
}

fn exec(contents: &[u8]) -> Node {
    Node::Regular {
        executable: true,
        contents: contents.to_vec(),
    }
}

fn link(target: &[u8]) -> Node {
    Node::Symlink {
        target: target.to_vec(),
    }
}

fn dir<const N: usize>(entries: [(&[u8], Node); N]) -> Node {
    Node::Directory(entries.into_iter().map(|(n, c)| (n.to_vec(), c)).collect())
}

fn write_node(node: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    narflow::format::nar::writer::write_node(node, &mut out).unwrap();
    out
}

/// Asserts two NARs are equal, reporting the first differing byte rather than both NARs.
fn assert_same_nar(ours: &[u8], nix: &[u8], what: &str) {
    if ours != nix {
        let at = ours
            .iter()
            .zip(nix)
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(nix.len()));
        panic!(
            "{what}: NARs differ at byte {at} (ours {} bytes, Nix's {} bytes)",
            ours.len(),
            nix.len()
        );
    }
}

/// Materialises `node` under a unique name, adds it to the store, and checks that Nix's
/// NAR, ours from the store path, and ours from the in-memory tree are the same bytes,
/// and that our reader reads Nix's NAR back as `node`.
fn check_against_nix(tag: &str, node: &Node) {
    let tmp = tempdir();
    let src = tmp.path().join(unique(tag));
    narflow::nar_fs::restore(node, &src).unwrap();
    let store_path = nix_store_add(&src);
    let store_path = Path::new(&store_path);

    let nix = nix_store_dump(store_path);
    let mut ours = Vec::new();
    let size = writer::dump_path(store_path, &mut ours).unwrap();
    assert_eq!(size, ours.len() as u64);
    assert_same_nar(&ours, &nix, &format!("dump_path({})", store_path.display()));
    assert_same_nar(&write_node(node), &nix, "write_node");

    let tree = reader::read_tree(&nix[..]).unwrap();
    assert_eq!(&tree, node);
    assert_same_nar(&write_node(&tree), &nix, "read_tree then write_node");
}

#[test]
fn tricky_tree_matches_nix() {
    let id = unique("content");
    let mut deep = file(id.as_bytes());
    for level in (0..50).rev() {
        deep = Node::Directory(BTreeMap::from([(
            format!("level{level}").into_bytes(),
            deep,
        )]));
    }
    let long_name = vec![b'n'; 255];
    let tree = dir([
        (b"unique", file(id.as_bytes())),
        (b"empty", file(b"")),
        (b"one", file(b"1")),
        (b"eight", file(b"87654321")),
        (b"nine", file(b"123456789")),
        (b"empty-dir", dir([])),
        (b"exec", exec(b"#!/bin/sh\necho hi\n")),
        (b"exec-empty", exec(b"")),
        (b"abs-link", link(b"/etc/passwd")),
        (b"rel-link", link(b"../up/and/over")),
        (b"dangling", link(b"does-not-exist")),
        (b"dir-link", link(b"empty-dir")),
        (b"self-link", link(b"self-link")),
        (b"odd-target", link(b"\xff\xfe target with spaces")),
        // Bytewise order differs from locale order: B Z _ a \xc3\xa9 \xff\xfe.
        (b"B", file(b"B")),
        (b"a", file(b"a")),
        (b"_", file(b"_")),
        (b"Z", file(b"Z")),
        ("é".as_bytes(), file("é".as_bytes())),
        (b"\xff\xfe", file(b"not UTF-8")),
        (b"with space", file(b"")),
        (b"new\nline", file(b"")),
        (b".hidden", file(b"")),
        (b"-dash", file(b"")),
        (&long_name, file(b"long name")),
        (b"deep", deep),
        (
            b"sub",
            dir([(b"x", exec(b"x")), (b"y", dir([(b"z", link(b"../x"))]))]),
        ),
    ]);
    check_against_nix("tricky", &tree);
}

#[test]
fn root_regular_file_matches_nix() {
    check_against_nix("file", &file(unique("root file").as_bytes()));
}

#[test]
fn root_executable_matches_nix() {
    check_against_nix(
        "exec",
        &exec(format!("#!/bin/sh\n# {}\n", unique("x")).as_bytes()),
    );
}

#[test]
fn root_symlink_is_not_followed() {
    check_against_nix(
        "link",
        &link(format!("/nonexistent/{}", unique("target")).as_bytes()),
    );
}

#[test]
fn root_empty_directory_matches_nix() {
    // An empty directory can hold no unique content: its unique name makes the path.
    check_against_nix("empty-dir", &dir([]));
}

/// Sha256 of everything written to it.
struct HashWriter {
    hasher: Sha256,
    len: u64,
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HashWriter {
    fn new() -> Self {
        HashWriter {
            hasher: Sha256::new(),
            len: 0,
        }
    }
}

/// Runs `nix-store --dump path` and hands its output stream to `f`.
fn with_nix_dump<T>(path: &Path, f: impl FnOnce(&mut dyn Read) -> T) -> T {
    let mut child = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run nix-store --dump");
    let result = f(child.stdout.as_mut().unwrap());
    assert!(
        child.wait().unwrap().success(),
        "nix-store --dump {} failed",
        path.display()
    );
    result
}

/// Hashes the contents of the one regular file in a NAR.
struct ContentsHasher(Option<(u64, [u8; 32])>);

impl NarVisitor for ContentsHasher {
    fn directory(&mut self, _: &[&[u8]]) -> io::Result<()> {
        Err(io::Error::other("unexpected directory"))
    }
    fn symlink(&mut self, _: &[&[u8]], _: &[u8]) -> io::Result<()> {
        Err(io::Error::other("unexpected symlink"))
    }
    fn regular(
        &mut self,
        _: &[&[u8]],
        _: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<()> {
        let mut h = HashWriter::new();
        io::copy(contents, &mut h)?;
        assert_eq!(h.len, size);
        self.0 = Some((size, h.hasher.finalize().into()));
        Ok(())
    }
}

#[test]
fn large_file_matches_nix() {
    const SIZE: u64 = 100 * 1024 * 1024 + 13;
    let tmp = tempdir();
    let src = tmp.path().join(unique("large"));
    let mut content_hash = HashWriter::new();
    {
        let mut out = io::BufWriter::new(fs::File::create(&src).unwrap());
        let id = unique("large content");
        let mut x = 0x2545_f491_4f6c_dd1d_u64
            ^ id.bytes()
                .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
        let mut block = id.into_bytes();
        while content_hash.len < SIZE {
            block.truncate(0);
            for _ in 0..8192 {
                // xorshift64: fast, and not compressible by accident.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                block.extend_from_slice(&x.to_le_bytes());
            }
            block.truncate(block.len().min((SIZE - content_hash.len) as usize));
            out.write_all(&block).unwrap();
            content_hash.write_all(&block).unwrap();
        }
        out.flush().unwrap();
    }
    let content_hash: [u8; 32] = content_hash.hasher.finalize().into();
    let store_path = nix_store_add(&src);
    let store_path = Path::new(&store_path);

    let nix = with_nix_dump(store_path, |r| {
        let mut h = HashWriter::new();
        io::copy(r, &mut h).unwrap();
        (h.len, h.hasher.finalize())
    });
    let mut ours = HashWriter::new();
    let size = writer::dump_path(store_path, &mut ours).unwrap();
    assert_eq!(size, ours.len);
    assert_eq!(
        (ours.len, ours.hasher.finalize()),
        nix,
        "NAR of {}",
        store_path.display()
    );

    let mut visitor = ContentsHasher(None);
    let parsed = with_nix_dump(store_path, |r| reader::parse(r, &mut visitor).unwrap());
    assert_eq!(parsed, nix.0);
    assert_eq!(visitor.0, Some((SIZE, content_hash)));

    // Don't leave 100 MiB in the store for every run.
    run(Command::new("nix-store").arg("--delete").arg(store_path));
}
