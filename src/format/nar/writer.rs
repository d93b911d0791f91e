//! NAR writer: streams a file system tree (or an in-memory [`Node`]) to any `Write`.
//! Never follows symlinks; reads files with read(), never mmap.
use super::Node;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NarWriteError {
    /// Reading the file system failed at `path`.
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// `path` is neither a regular file, a directory nor a symlink (socket, fifo, device).
    #[error(
        "{path}: unsupported file type (only regular files, directories and symlinks can be archived)"
    )]
    UnsupportedFileType { path: PathBuf },
    /// A file changed size while it was read.
    #[error("{path}: file changed while it was read ({expected} bytes expected, {actual} read)")]
    FileChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// Writing the NAR to the output failed.
    #[error("writing NAR: {0}")]
    Write(#[source] io::Error),
}

/// Serialises the tree at `path` as a NAR to `out`, returning the NAR size in bytes.
///
/// # Errors
/// [`NarWriteError`] naming the file that could not be read, or the write error.
pub fn dump_path<W: Write>(path: &Path, out: &mut W) -> Result<u64, NarWriteError> {
    let _ = (path, out);
    unimplemented!()
}

/// Serialises an in-memory tree as a NAR.
pub fn write_node<W: Write>(node: &Node, out: &mut W) -> io::Result<u64> {
    let _ = (node, out);
    unimplemented!()
}
