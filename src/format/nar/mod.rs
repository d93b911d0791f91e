//! The NAR (Nix ARchive) format: a canonical serialisation of a file system tree.
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

pub mod reader;
pub mod writer;

/// An in-memory file system tree, as a NAR describes it. Used by tests, the fuzzer and
/// small tools; large trees are streamed with [`writer::dump_path`] and [`reader::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Regular {
        executable: bool,
        contents: Vec<u8>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Entry names are bytes; the map keeps them sorted bytewise as NAR requires.
    Directory(std::collections::BTreeMap<Vec<u8>, Node>),
}
