//! NAR reader round trip. The reader is strict (it accepts only the canonical NARs real Nix
//! writes), so any input it accepts must serialise back to exactly the same bytes. The
//! streaming parser and the in-memory reader must agree on every input: both accept it and
//! see the same tree, or both reject it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use narflow::format::nar::{Node, reader, writer};
use std::collections::BTreeMap;
use std::io::{self, Read};

fuzz_target!(|data: &[u8]| {
    let tree = reader::read_tree(data);

    let mut rebuilt = TreeBuilder::default();
    let parsed = reader::parse(data, &mut rebuilt);

    match (&tree, &parsed) {
        (Ok(node), Ok(nar_size)) => {
            assert_eq!(
                *nar_size,
                data.len() as u64,
                "parse: NAR size differs from input length"
            );
            let root = rebuilt
                .root
                .as_ref()
                .expect("parse accepted a NAR but visited no root node");
            assert_eq!(root, node, "parse and read_tree see different trees");
            assert_eq!(
                rebuilt.regular_bytes,
                content_bytes(node),
                "parse: contents bytes differ"
            );
        }
        (Err(_), Err(_)) => return,
        (Ok(_), Err(e)) => panic!("read_tree accepted the NAR but parse rejected it: {e}"),
        (Err(e), Ok(_)) => panic!("parse accepted the NAR but read_tree rejected it: {e}"),
    }
    let node = tree.unwrap();

    let mut out = Vec::with_capacity(data.len());
    let written = writer::write_node(&node, &mut out).expect("write_node to a Vec cannot fail");
    assert_eq!(
        written,
        out.len() as u64,
        "write_node: returned size differs from bytes written"
    );
    if out != data {
        let at = out
            .iter()
            .zip(data)
            .position(|(a, b)| a != b)
            .unwrap_or(out.len().min(data.len()));
        panic!(
            "write_node(read_tree(nar)) is not the input NAR: {} bytes written, {} read, first difference at byte {at}",
            out.len(),
            data.len()
        );
    }
});

/// Total length of all regular files' contents.
fn content_bytes(node: &Node) -> u64 {
    match node {
        Node::Regular { contents, .. } => contents.len() as u64,
        Node::Symlink { .. } => 0,
        Node::Directory(entries) => entries.values().map(content_bytes).sum(),
    }
}

/// A visitor that rebuilds the tree from [`reader::parse`]'s callbacks, so it can be
/// compared with [`reader::read_tree`]'s. Directories are created on first mention, so it
/// works whether `directory` is called before or after the entries inside it.
#[derive(Default)]
struct TreeBuilder {
    root: Option<Node>,
    regular_bytes: u64,
}

impl TreeBuilder {
    fn insert(&mut self, path: &[&[u8]], node: Node) {
        let Some((name, parents)) = path.split_last() else {
            assert!(self.root.is_none(), "parse visited the root twice");
            self.root = Some(node);
            return;
        };
        let mut dir = self
            .root
            .get_or_insert_with(|| Node::Directory(BTreeMap::new()));
        for parent in parents {
            let Node::Directory(entries) = dir else {
                panic!("parse visited an entry below a non-directory: {path:?}");
            };
            dir = entries
                .entry(parent.to_vec())
                .or_insert_with(|| Node::Directory(BTreeMap::new()));
        }
        let Node::Directory(entries) = dir else {
            panic!("parse visited an entry below a non-directory: {path:?}");
        };
        match entries.get_mut(*name) {
            // A directory created on first mention of one of its entries.
            Some(Node::Directory(_)) if matches!(node, Node::Directory(_)) => {}
            Some(_) => panic!("parse visited {path:?} twice"),
            None => {
                entries.insert(name.to_vec(), node);
            }
        }
    }
}

impl reader::NarVisitor for TreeBuilder {
    fn directory(&mut self, path: &[&[u8]]) -> io::Result<()> {
        if path.is_empty() && matches!(self.root, Some(Node::Directory(_))) {
            // The root directory, already created by one of its entries.
            return Ok(());
        }
        self.insert(path, Node::Directory(BTreeMap::new()));
        Ok(())
    }

    fn symlink(&mut self, path: &[&[u8]], target: &[u8]) -> io::Result<()> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_vec(),
            },
        );
        Ok(())
    }

    fn regular(
        &mut self,
        path: &[&[u8]],
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<()> {
        // Never allocate `size` up front: it comes from the input.
        let mut buf = Vec::new();
        (&mut *contents).take(size).read_to_end(&mut buf)?;
        if buf.len() as u64 != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "NAR contents shorter than declared",
            ));
        }
        self.regular_bytes += size;
        self.insert(
            path,
            Node::Regular {
                executable,
                contents: buf,
            },
        );
        Ok(())
    }
}
