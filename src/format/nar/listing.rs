//! NAR listings: the JSON document `<hash part>.ls` that Nix writes beside a narinfo when a
//! binary cache has `write-nar-listing=1`, so that tools can browse a store path in the
//! cache and fetch one file by its byte range in the NAR, without the whole NAR.
//!
//! This module owns the listing's exact bytes, as Nix 2.8 writes them:
//! `{"version":1,"root":NODE}` where NODE is one of
//! `{"type":"regular","size":N,"executable":true,"narOffset":N}` (`executable` only when
//! set), `{"type":"symlink","target":S}` or `{"type":"directory","entries":{NAME:NODE,...}}`
//! (names sorted bytewise, as in the NAR). There is no whitespace; keys come in that order.
//! Strings are escaped as Nix's own JSON writer escapes them: `"` and `\` with a backslash,
//! newline, carriage return and tab as `\n` `\r` `\t`, other bytes below 0x20 as `\u00xx`,
//! and every other byte as it is — so a name that is not UTF-8 stays as its bytes, and the
//! document is then not strictly JSON, exactly as with Nix.
//!
//! `narOffset` is where a file's contents start in the NAR. A NAR's layout follows from the
//! tree's names, types, sizes and symlink targets alone, so a listing needs only metadata
//! (lstat, readdir, readlink), never file contents: a walker of trees on disk reads them
//! that way and must agree with [`super::writer`] byte for byte, which the tests check.
//! This module reads no file system itself. The writer can also build the
//! listing as it writes the NAR ([`ListingBuilder`]), at no cost in system calls. Every
//! walk is iterative, so a deep tree costs heap, not stack.
use super::{NAR_MAGIC, Node, padding_len};

/// A store path's listing: its JSON bytes and the size of the NAR it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarListing {
    json: Vec<u8>,
    nar_size: u64,
}

impl NarListing {
    /// The `.ls` document, as Nix writes it (no trailing newline).
    pub fn json(&self) -> &[u8] {
        &self.json
    }
    /// The size of the NAR the listing describes. A caller that also has the NAR checks
    /// that the two agree: if not, the tree changed between the two walks.
    pub fn nar_size(&self) -> u64 {
        self.nar_size
    }
}

/// Lists an in-memory tree as the NAR [`super::writer::write_node`] makes of it.
pub fn list_node(root: &Node) -> NarListing {
    enum Step<'a> {
        Node(&'a Node),
        Entry(&'a [u8], &'a Node),
        CloseEntry,
        CloseDirectory,
    }
    let mut b = ListingBuilder::new();
    let mut todo = vec![Step::Node(root)];
    while let Some(step) = todo.pop() {
        match step {
            Step::Node(node) => match node {
                Node::Regular {
                    executable,
                    contents,
                } => b.regular(*executable, contents.len() as u64),
                Node::Symlink { target } => b.symlink(target),
                Node::Directory(entries) => {
                    b.open_directory();
                    todo.push(Step::CloseDirectory);
                    for (name, child) in entries.iter().rev() {
                        todo.push(Step::Entry(name, child));
                    }
                }
            },
            Step::Entry(name, child) => {
                b.open_entry(name);
                todo.push(Step::CloseEntry);
                todo.push(Step::Node(child));
            }
            Step::CloseEntry => b.close_entry(),
            Step::CloseDirectory => b.close_directory(),
        }
    }
    b.finish()
}

/// Bytes a NAR string of `len` bytes takes: its u64 length, the bytes, the padding.
fn string_len(len: u64) -> u64 {
    8 + len + padding_len(len) as u64
}

/// Bytes the NAR strings `tokens` take.
fn tokens_len(tokens: &[&[u8]]) -> u64 {
    tokens.iter().map(|t| string_len(t.len() as u64)).sum()
}

/// Builds a listing from the nodes of a NAR, given in NAR order (which is also the
/// listing's order), following the NAR's layout to know each file's offset.
/// A walker of trees on disk drives one while it writes the NAR, so that the listing
/// costs no system call of its own.
#[derive(Debug)]
pub struct ListingBuilder {
    json: Vec<u8>,
    /// NAR bytes before the current position.
    offset: u64,
    /// For each open directory: whether it has no entry yet (no comma before the next).
    first: Vec<bool>,
}

impl Default for ListingBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ListingBuilder {
    pub fn new() -> Self {
        ListingBuilder {
            json: br#"{"version":1,"root":"#.to_vec(),
            offset: string_len(NAR_MAGIC.len() as u64),
            first: Vec::new(),
        }
    }

    pub(crate) fn regular(&mut self, executable: bool, size: u64) {
        self.offset += tokens_len(&[b"(", b"type", b"regular"]);
        if executable {
            self.offset += tokens_len(&[b"executable", b""]);
        }
        // The contents follow the string "contents" and their u64 length.
        self.offset += tokens_len(&[b"contents"]) + 8;
        self.json.extend_from_slice(br#"{"type":"regular","size":"#);
        self.json.extend_from_slice(size.to_string().as_bytes());
        if executable {
            self.json.extend_from_slice(br#","executable":true"#);
        }
        // Nix writes narOffset only when it is not 0, which it never is: a NAR starts
        // with its magic string.
        self.json.extend_from_slice(br#","narOffset":"#);
        self.json
            .extend_from_slice(self.offset.to_string().as_bytes());
        self.json.push(b'}');
        self.offset += size + padding_len(size) as u64 + tokens_len(&[b")"]);
    }

    pub(crate) fn symlink(&mut self, target: &[u8]) {
        self.offset += tokens_len(&[b"(", b"type", b"symlink", b"target", target, b")"]);
        self.json
            .extend_from_slice(br#"{"type":"symlink","target":"#);
        self.string(target);
        self.json.push(b'}');
    }

    pub(crate) fn open_directory(&mut self) {
        self.offset += tokens_len(&[b"(", b"type", b"directory"]);
        self.json
            .extend_from_slice(br#"{"type":"directory","entries":{"#);
        self.first.push(true);
    }

    pub(crate) fn close_directory(&mut self) {
        self.offset += tokens_len(&[b")"]);
        self.json.extend_from_slice(b"}}");
        self.first.pop();
    }

    /// An entry of the innermost open directory; its node follows.
    pub(crate) fn open_entry(&mut self, name: &[u8]) {
        self.offset += tokens_len(&[b"entry", b"(", b"name", name, b"node"]);
        let first = self
            .first
            .last_mut()
            .expect("an entry is inside a directory");
        if !std::mem::replace(first, false) {
            self.json.push(b',');
        }
        self.string(name);
        self.json.push(b':');
    }

    pub(crate) fn close_entry(&mut self) {
        self.offset += tokens_len(&[b")"]);
    }

    /// A JSON string, escaped as Nix 2.8's writer escapes it (see the module header).
    fn string(&mut self, s: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.json.push(b'"');
        for &c in s {
            match c {
                b'"' | b'\\' => self.json.extend_from_slice(&[b'\\', c]),
                b'\n' => self.json.extend_from_slice(b"\\n"),
                b'\r' => self.json.extend_from_slice(b"\\r"),
                b'\t' => self.json.extend_from_slice(b"\\t"),
                0..=0x1f => self.json.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(c >> 4)],
                    HEX[usize::from(c & 0xf)],
                ]),
                _ => self.json.push(c),
            }
        }
        self.json.push(b'"');
    }

    /// NAR bytes before the next node.
    pub(crate) fn nar_offset(&self) -> u64 {
        self.offset
    }

    /// The listing, once every node has been given.
    pub fn finish(mut self) -> NarListing {
        debug_assert!(self.first.is_empty(), "every directory is closed");
        self.json.push(b'}');
        NarListing {
            json: self.json,
            nar_size: self.offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::nar::writer::{NarBuffer, write_node};
    // The file system side of listings is the walker's; these tests check the two agree.
    use crate::nar_fs::{dump_path, dump_path_listed_into, list_path, restore};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::io;

    fn file(executable: bool, contents: &[u8]) -> Node {
        Node::Regular {
            executable,
            contents: contents.to_vec(),
        }
    }

    fn dir(entries: Vec<(&[u8], Node)>) -> Node {
        Node::Directory(
            entries
                .into_iter()
                .map(|(n, node)| (n.to_vec(), node))
                .collect(),
        )
    }

    /// Offsets worked out by hand from the NAR grammar, independently of the builder.
    #[test]
    fn golden_bytes_and_offsets() {
        // magic 24, "(" 16, "type" 16, "regular" 16, "contents" 16, length 8: 96.
        let l = list_node(&file(false, b"hello"));
        assert_eq!(
            std::str::from_utf8(l.json()).unwrap(),
            r#"{"version":1,"root":{"type":"regular","size":5,"narOffset":96}}"#
        );
        // + 5 bytes, 3 of padding, ")" 16.
        assert_eq!(l.nar_size(), 96 + 8 + 16);
        // "executable" 24 and "" 8 come before "contents".
        let l = list_node(&file(true, b""));
        assert_eq!(
            std::str::from_utf8(l.json()).unwrap(),
            r#"{"version":1,"root":{"type":"regular","size":0,"executable":true,"narOffset":128}}"#
        );
        // magic 24, "(" "type" 32, "directory" 24; entry "a": "entry" "(" "name" "a"
        // "node" 80, then the file's "(" "type" "regular" "contents" 64 and its length 8.
        let tree = dir(vec![
            (b"a", file(false, b"x")),
            (
                b"b",
                Node::Symlink {
                    target: b"a".to_vec(),
                },
            ),
            (b"c", dir(vec![])),
        ]);
        let l = list_node(&tree);
        assert_eq!(
            std::str::from_utf8(l.json()).unwrap(),
            concat!(
                r#"{"version":1,"root":{"type":"directory","entries":{"#,
                r#""a":{"type":"regular","size":1,"narOffset":232},"#,
                r#""b":{"type":"symlink","target":"a"},"#,
                r#""c":{"type":"directory","entries":{}}}}}"#
            )
        );
        assert_eq!(l.nar_size(), write_node(&tree, &mut Vec::new()).unwrap());
    }

    #[test]
    fn strings_are_escaped_as_nix_escapes_them() {
        let name = b"q\"b\\n\nr\rt\tc\x01\x1f\x7f \xc3\xa9\xff/".to_vec();
        let tree = Node::Directory(BTreeMap::from([(
            b"e".to_vec(),
            Node::Symlink {
                target: name.clone(),
            },
        )]));
        let json = list_node(&tree).json().to_vec();
        let expected: &[u8] =
            b"\"target\":\"q\\\"b\\\\n\\nr\\rt\\tc\\u0001\\u001f\x7f \xc3\xa9\xff/\"";
        assert!(
            json.windows(expected.len()).any(|w| w == expected),
            "{}",
            json.escape_ascii()
        );
    }

    /// Every `"narOffset":N` and `"size":N` of a listing, in order.
    fn offsets_and_sizes(json: &[u8]) -> Vec<(u64, u64)> {
        let text = String::from_utf8_lossy(json);
        let number = |s: &str| -> u64 {
            s.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap()
        };
        text.split(r#""type":"regular","size":"#)
            .skip(1)
            .map(|rest| {
                let offset = rest.split(r#""narOffset":"#).nth(1).unwrap();
                (number(offset), number(rest))
            })
            .collect()
    }

    /// Regular files' contents in NAR order.
    fn contents_in_order(node: &Node, out: &mut Vec<Vec<u8>>) {
        match node {
            Node::Regular { contents, .. } => out.push(contents.clone()),
            Node::Symlink { .. } => {}
            Node::Directory(entries) => entries.values().for_each(|n| contents_in_order(n, out)),
        }
    }

    /// Trees with names and targets free of the bytes whose escaping would hide a
    /// `"size":` in a name (so the test's scan of the JSON stays simple).
    fn arb_node() -> impl Strategy<Value = Node> {
        let name = prop::collection::vec(prop_oneof![b'a'..=b'f', Just(b'.'), 0x80u8..=0xff], 1..6)
            .prop_filter("not . or ..", |n| n != b"." && n != b"..")
            .boxed();
        let leaf = prop_oneof![
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..100)).prop_map(
                |(executable, contents)| Node::Regular {
                    executable,
                    contents
                }
            ),
            prop::collection::vec(1u8..=255, 1..20).prop_map(|target| Node::Symlink { target }),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop::collection::btree_map(name.clone(), inner, 0..6).prop_map(Node::Directory)
        })
    }

    /// A growing `Vec` as the writer's in-place buffer.
    #[derive(Default)]
    struct VecBuffer {
        buf: Vec<u8>,
        filled: usize,
    }

    impl NarBuffer for VecBuffer {
        fn spare(&mut self) -> io::Result<&mut [u8]> {
            if self.buf.len() == self.filled {
                self.buf.resize(self.filled + 4096, 0);
            }
            Ok(&mut self.buf[self.filled..])
        }
        fn commit(&mut self, n: usize) {
            self.filled += n;
        }
    }

    proptest! {
        /// The layout agrees with the writer: the same NAR size, and each file's contents
        /// sit at its narOffset, right after their u64 length.
        #[test]
        fn offsets_point_at_the_contents_in_the_nar(node in arb_node()) {
            let mut nar = Vec::new();
            let size = write_node(&node, &mut nar).unwrap();
            let listing = list_node(&node);
            prop_assert_eq!(listing.nar_size(), size);
            let mut contents = Vec::new();
            contents_in_order(&node, &mut contents);
            let found = offsets_and_sizes(listing.json());
            prop_assert_eq!(found.len(), contents.len());
            for ((offset, len), data) in found.into_iter().zip(contents) {
                let (at, len) = (offset as usize, len as usize);
                prop_assert_eq!(len, data.len());
                prop_assert_eq!(&nar[at - 8..at], &(len as u64).to_le_bytes()[..]);
                prop_assert_eq!(&nar[at..at + len], &data[..]);
            }
        }

        /// Listing a tree on disk (metadata only) gives what listing it in memory gives,
        /// and the NAR size of dumping it.
        #[test]
        fn list_path_matches_list_node(node in arb_node()) {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("root");
            restore(&node, &root).unwrap();
            let listing = list_path(&root).unwrap();
            prop_assert_eq!(&listing, &list_node(&node));
            prop_assert_eq!(listing.nar_size(), dump_path(&root, &mut io::sink()).unwrap());
            // The listing the writer builds as it writes the NAR is the same, and so is
            // the NAR.
            let mut builder = ListingBuilder::new();
            let mut out = VecBuffer::default();
            let size = dump_path_listed_into(&root, &mut out, Some(&mut builder)).unwrap();
            prop_assert_eq!(size, listing.nar_size());
            prop_assert_eq!(&builder.finish(), &listing);
            let mut nar = Vec::new();
            dump_path(&root, &mut nar).unwrap();
            prop_assert_eq!(&out.buf[..out.filled], &nar[..]);
        }
    }

    #[test]
    fn errors_name_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing");
        let e = list_path(&missing).unwrap_err().to_string();
        assert!(e.contains(&*missing.to_string_lossy()), "{e}");
        let fifo = tmp.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&fifo).unwrap();
        let e = list_path(&fifo).unwrap_err().to_string();
        assert!(
            e.contains(&*fifo.to_string_lossy()) && e.contains("unsupported file type"),
            "{e}"
        );
    }
}
