//! The NAR (Nix ARchive) format: a canonical serialisation of a file system tree.
//!
//! This module owns the wire grammar, the in-memory [`Node`] tree and the rules shared by
//! the [`writer`] and the [`reader`] (tokens, padding, valid entry names). It is pure and
//! synchronous: it never touches tokio, the network, the local store database or the
//! file system.
//!
//! Wire grammar (every string is a u64 little-endian length, the bytes, zero padding to a
//! multiple of 8):
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink   = "symlink" "target" <bytes>
//! directory = "directory" { "entry" "(" "name" <bytes> "node" node ")" }
//! ```
//! Entries are sorted bytewise and unique; names are non-empty, not `.` or `..`, and contain
//! no `/` or NUL.

pub mod listing;
pub mod reader;
pub mod writer;

/// An in-memory file system tree, as a NAR describes it. Used by tests, the fuzzer and
/// small tools; large NARs are read with [`reader::parse`], never whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A regular file; `executable` is the owner x bit.
    Regular { executable: bool, contents: Vec<u8> },
    /// A symlink; the target is raw bytes, never resolved.
    Symlink { target: Vec<u8> },
    /// Entry names are bytes; the map keeps them sorted bytewise as NAR requires.
    Directory(std::collections::BTreeMap<Vec<u8>, Node>),
}

/// The first string of every NAR.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Number of zero bytes that follow a string of `len` bytes on the wire.
pub(crate) fn padding_len(len: u64) -> usize {
    // Lossless: the result is below 8.
    (len.wrapping_neg() % 8) as usize
}

/// Checks the NAR rules for a directory entry name; the error says which rule is broken.
pub(crate) fn check_entry_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("empty name")
    } else if name == b"." || name == b".." {
        Err("`.` and `..` are not allowed")
    } else if name.contains(&b'/') {
        Err("name contains `/`")
    } else if name.contains(&0) {
        Err("name contains a NUL byte")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Hand-made wire bytes shared by the writer and reader tests, and the property tests
    //! that tie the writer, the reader and the file system together.
    use super::reader::read_tree;
    use super::writer::write_node;
    use super::*;
    use crate::nar_fs::{dump_path, restore};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// One NAR string, spelled out independently of the writer's encoder.
    pub(super) fn str_(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s);
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        out
    }

    /// A NAR: the magic followed by `tokens`, each as a string.
    pub(super) fn nar(tokens: &[&[u8]]) -> Vec<u8> {
        let mut out = str_(b"nix-archive-1");
        for t in tokens {
            out.extend_from_slice(&str_(t));
        }
        out
    }

    #[test]
    fn padding_lengths() {
        let pads: Vec<usize> = (0..10).map(padding_len).collect();
        assert_eq!(pads, [0, 7, 6, 5, 4, 3, 2, 1, 0, 7]);
        assert_eq!(padding_len(u64::MAX), 1);
    }

    /// Entry names that can exist on disk: 1 to 12 bytes, often non-UTF-8.
    fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            b'a'..=b'e',
            Just(b'.'),
            Just(b'A'),
            Just(b'_'),
            0x80u8..=0xff,
            any::<u8>().prop_filter("no NUL or /", |b| *b != 0 && *b != b'/'),
        ];
        prop::collection::vec(byte, 1..12).prop_filter("not . or ..", |n| n != b"." && n != b"..")
    }

    /// Random trees; with `on_disk`, only symlink targets a file system can store
    /// (non-empty, no NUL).
    fn arb_node(on_disk: bool) -> impl Strategy<Value = Node> {
        let contents = prop_oneof![
            Just(Vec::new()),
            prop::collection::vec(any::<u8>(), 0..40),
            prop::collection::vec(any::<u8>(), 0..3000),
        ];
        let target = if on_disk {
            prop::collection::vec(1u8..=255, 1..40).boxed()
        } else {
            prop::collection::vec(any::<u8>(), 0..40).boxed()
        };
        let leaf = prop_oneof![
            (any::<bool>(), contents).prop_map(|(executable, contents)| Node::Regular {
                executable,
                contents
            }),
            target.prop_map(|target| Node::Symlink { target }),
        ];
        leaf.prop_recursive(5, 64, 8, |inner| {
            prop::collection::btree_map(arb_name(), inner, 0..8).prop_map(Node::Directory)
        })
    }

    #[test]
    fn restore_refuses_names_that_leave_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let file = Node::Regular {
            executable: false,
            contents: b"x".to_vec(),
        };
        for bad in [&b".."[..], b"a/b", b""] {
            let node = Node::Directory(BTreeMap::from([(bad.to_vec(), file.clone())]));
            let root = dir.path().join(format!("root{}", bad.len()));
            let err = restore(&node, &root).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
            assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        }
        assert!(!dir.path().join("x").exists());
    }

    fn to_nar(node: &Node) -> Vec<u8> {
        let mut out = Vec::new();
        let size = write_node(node, &mut out).unwrap();
        assert_eq!(size, out.len() as u64);
        out
    }

    proptest! {
        #[test]
        fn write_read_round_trip(node in arb_node(false)) {
            let bytes = to_nar(&node);
            let back = read_tree(&bytes[..]).unwrap();
            prop_assert_eq!(&back, &node);
            prop_assert_eq!(to_nar(&back), bytes);
        }

        #[test]
        fn dump_path_matches_write_node(node in arb_node(true)) {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            restore(&node, &root).unwrap();
            let mut dumped = Vec::new();
            let size = dump_path(&root, &mut dumped).unwrap();
            prop_assert_eq!(size, dumped.len() as u64);
            prop_assert_eq!(&dumped, &to_nar(&node));
        }
    }

    #[test]
    fn deep_tree_round_trips() {
        let mut node = Node::Symlink {
            target: b"/".to_vec(),
        };
        for _ in 0..reader::MAX_DEPTH {
            node = Node::Directory(BTreeMap::from([(b"d".to_vec(), node)]));
        }
        let bytes = to_nar(&node);
        assert_eq!(read_tree(&bytes[..]).unwrap(), node);
    }
}
