//! NAR writer: streams a file system tree (or an in-memory [`Node`]) to any `Write`.
//!
//! This is the hot path of narflow: every byte uploaded passes through [`dump_path`]. It
//! owns the buffered token encoder shared by both entry points, and it must never follow a
//! symlink, never mmap a file (a file truncated under a mapping raises SIGBUS), and never
//! hold memory that grows with file size: file contents are read with read() straight into
//! one fixed buffer that is handed to the output in large slices.
use super::listing::ListingBuilder;
use super::{NAR_MAGIC, Node, check_entry_name, padding_len};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Buffer of [`dump_path`]: file contents are read into it and written out from it.
/// 256 KiB keeps it in L2 cache while making read()/write() overhead negligible.
const DUMP_BUFFER_SIZE: usize = 256 * 1024;

/// Buffer of [`write_node`]: it only batches tokens and small files (large contents are
/// written straight from the `Node`), so it is kept small for the fuzzer's many calls.
const NODE_BUFFER_SIZE: usize = 16 * 1024;

/// Why a tree could not be archived. Every variant about the file system names the path.
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
    /// A file changed size while it was read: its metadata said `expected` bytes, but
    /// `actual` bytes were read (when the file grew, `actual` is a lower bound). Retrying
    /// can help once the file stops changing; store paths never should.
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
/// `path` itself is not followed when it is a symlink. Directory entries are sorted
/// bytewise, a regular file is executable when its owner x bit is set, and file contents
/// are read with read() and checked against the size in the file's metadata.
///
/// Small tokens and small files are batched internally, so `out` need not be buffered:
/// it sees writes of up to 256 KiB. All bytes have been passed to `out` when this returns
/// `Ok`, but `out.flush()` is not called. On error, a prefix of the NAR may have been
/// written.
///
/// # Errors
/// - [`NarWriteError::Read`] naming the file or directory that could not be read;
/// - [`NarWriteError::UnsupportedFileType`] naming a socket, fifo or device;
/// - [`NarWriteError::FileChanged`] when a file's length differs from its metadata size
///   (it was modified while being archived: retrying may help);
/// - [`NarWriteError::Write`] when `out` fails.
pub fn dump_path<W: Write>(path: &Path, out: &mut W) -> Result<u64, NarWriteError> {
    let mut buffered = BufferedOut::new(out, DUMP_BUFFER_SIZE);
    let size = dump_path_into(path, &mut buffered)?;
    buffered.flush().map_err(NarWriteError::Write)?;
    Ok(size)
}

/// Like [`dump_path`], but the NAR goes straight into `out`'s own memory: file contents
/// are read() into the space [`NarBuffer::spare`] hands out, with no intermediate copy.
///
/// # Errors
/// As [`dump_path`]; [`NarWriteError::Write`] carries the errors of `out`.
pub fn dump_path_into<B: NarBuffer + ?Sized>(
    path: &Path,
    out: &mut B,
) -> Result<u64, NarWriteError> {
    dump_path_listed_into(path, out, None)
}

/// Like [`dump_path_into`], and when `listing` is given, hands it every node as it is
/// written, so the NAR's listing ([`super::listing`]) comes with no system call of its
/// own. On error the listing is incomplete and must be dropped.
///
/// # Errors
/// As [`dump_path`]; [`NarWriteError::Write`] carries the errors of `out`.
pub fn dump_path_listed_into<B: NarBuffer + ?Sized>(
    path: &Path,
    out: &mut B,
    listing: Option<&mut ListingBuilder>,
) -> Result<u64, NarWriteError> {
    let mut dumper = Dumper {
        enc: Encoder::new(out),
        path: path.as_os_str().as_bytes().to_vec(),
        stack: Vec::new(),
        spare_lists: Vec::new(),
        listing,
    };
    dumper.run()?;
    if let Some(l) = &dumper.listing {
        debug_assert_eq!(
            l.nar_offset(),
            dumper.enc.written,
            "listing and NAR disagree"
        );
    }
    Ok(dumper.enc.written)
}

/// Memory the NAR encoder writes into in place: it asks for writable space and says how
/// much of it it used. [`dump_path_into`] reads file contents straight into it.
pub trait NarBuffer {
    /// Writable space at the end of the output; never empty.
    ///
    /// # Errors
    /// When no more space can be had (e.g. what the full buffer was handed to failed).
    fn spare(&mut self) -> io::Result<&mut [u8]>;
    /// The first `n` bytes of the space the last [`NarBuffer::spare`] returned are now
    /// part of the output. `n` is at most that space's length.
    fn commit(&mut self, n: usize);

    /// Appends `data`. The default copies it into [`NarBuffer::spare`]; a buffer in front
    /// of a writer may pass large slices straight through instead.
    ///
    /// # Errors
    /// As [`NarBuffer::spare`].
    fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let spare = self.spare()?;
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            self.commit(n);
            data = &data[n..];
        }
        Ok(())
    }
}

/// A fixed buffer in front of a `Write`: the [`NarBuffer`] of [`dump_path`] and
/// [`write_node`], so `out` sees few, large writes.
struct BufferedOut<'a, W: Write> {
    out: &'a mut W,
    buf: Box<[u8]>,
    /// Bytes of `buf` not yet written to `out`.
    filled: usize,
}

impl<'a, W: Write> BufferedOut<'a, W> {
    fn new(out: &'a mut W, capacity: usize) -> Self {
        debug_assert!(capacity >= 64, "tokens must fit the buffer");
        BufferedOut {
            out,
            buf: vec![0; capacity].into_boxed_slice(),
            filled: 0,
        }
    }

    /// Writes the buffered bytes to `out`.
    fn flush(&mut self) -> io::Result<()> {
        if self.filled > 0 {
            self.out.write_all(&self.buf[..self.filled])?;
            self.filled = 0;
        }
        Ok(())
    }
}

impl<W: Write> NarBuffer for BufferedOut<'_, W> {
    fn spare(&mut self) -> io::Result<&mut [u8]> {
        if self.filled == self.buf.len() {
            self.flush()?;
        }
        Ok(&mut self.buf[self.filled..])
    }
    fn commit(&mut self, n: usize) {
        debug_assert!(self.filled + n <= self.buf.len());
        self.filled += n;
    }
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let room = self.buf.len() - self.filled;
        if data.len() <= room {
            self.buf[self.filled..self.filled + data.len()].copy_from_slice(data);
            self.filled += data.len();
            return Ok(());
        }
        // Top the buffer up so `out` keeps seeing full buffers, then pass a large
        // remainder through without copying it.
        let (head, tail) = data.split_at(room);
        self.buf[self.filled..].copy_from_slice(head);
        self.filled += room;
        self.flush()?;
        if tail.len() >= self.buf.len() {
            self.out.write_all(tail)
        } else {
            self.buf[..tail.len()].copy_from_slice(tail);
            self.filled = tail.len();
            Ok(())
        }
    }
}

/// NarHash and NarSize of the tree at `path`, as Nix computes them (the SHA-256 and length
/// of its NAR), without keeping the NAR.
///
/// # Errors
/// As [`dump_path`].
pub fn hash_path(path: &Path) -> Result<(crate::format::hash::Sha256, u64), NarWriteError> {
    let mut w = crate::format::hash::HashingWriter::new(io::sink());
    dump_path(path, &mut w)?;
    let (_, hash, size) = w.finish();
    Ok((hash, size))
}

/// Serialises an in-memory tree as a NAR to `out`, returning the NAR size in bytes.
///
/// Like [`dump_path`], it batches small writes internally and does not flush `out`.
///
/// # Errors
/// The error of `out`, or [`io::ErrorKind::InvalidInput`] when a directory entry name
/// breaks the NAR rules (empty, `.`, `..`, or containing `/` or NUL); nothing is written
/// after the offending entry.
pub fn write_node<W: Write>(node: &Node, out: &mut W) -> io::Result<u64> {
    let mut buffered = BufferedOut::new(out, NODE_BUFFER_SIZE);
    let mut enc = Encoder::new(&mut buffered);
    enc.string(NAR_MAGIC)?;
    encode_node(&mut enc, node)?;
    let size = enc.written;
    buffered.flush()?;
    Ok(size)
}

fn encode_node<B: NarBuffer + ?Sized>(enc: &mut Encoder<'_, B>, node: &Node) -> io::Result<()> {
    match node {
        Node::Regular {
            executable,
            contents,
        } => {
            enc.regular_header(*executable, contents.len() as u64)?;
            enc.raw(contents)?;
            enc.padding(contents.len() as u64)?;
            enc.string(b")")
        }
        Node::Symlink { target } => enc.symlink(target),
        Node::Directory(entries) => {
            enc.strings(&[b"(", b"type", b"directory"])?;
            for (name, child) in entries {
                if let Err(why) = check_entry_name(name) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("invalid NAR entry name \"{}\": {why}", name.escape_ascii()),
                    ));
                }
                enc.entry_header(name)?;
                encode_node(enc, child)?;
                enc.string(b")")?;
            }
            enc.string(b")")
        }
    }
}

/// Low-level NAR encoder: strings with their length and padding, written into a
/// [`NarBuffer`].
struct Encoder<'a, B: NarBuffer + ?Sized> {
    out: &'a mut B,
    /// Bytes of NAR so far.
    written: u64,
}

impl<'a, B: NarBuffer + ?Sized> Encoder<'a, B> {
    fn new(out: &'a mut B) -> Self {
        Encoder { out, written: 0 }
    }

    /// Appends bytes as they are (no length, no padding).
    fn raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.append(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Appends the zero padding that follows a string of `len` bytes.
    fn padding(&mut self, len: u64) -> io::Result<()> {
        self.raw(&[0; 8][..padding_len(len)])
    }

    fn u64(&mut self, n: u64) -> io::Result<()> {
        self.raw(&n.to_le_bytes())
    }

    /// Appends one NAR string: length, bytes, padding.
    fn string(&mut self, s: &[u8]) -> io::Result<()> {
        self.u64(s.len() as u64)?;
        self.raw(s)?;
        self.padding(s.len() as u64)
    }

    fn strings(&mut self, ss: &[&[u8]]) -> io::Result<()> {
        ss.iter().try_for_each(|s| self.string(s))
    }

    /// Everything of a regular file node up to its contents, including the length prefix.
    fn regular_header(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.strings(&[b"(", b"type", b"regular"])?;
        if executable {
            self.strings(&[b"executable", b""])?;
        }
        self.string(b"contents")?;
        self.u64(size)
    }

    /// A whole symlink node.
    fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.strings(&[b"(", b"type", b"symlink", b"target", target, b")"])
    }

    /// Everything of a directory entry up to its node.
    fn entry_header(&mut self, name: &[u8]) -> io::Result<()> {
        self.strings(&[b"entry", b"(", b"name", name, b"node"])
    }

    /// Writable space for the NAR's next bytes; never empty.
    fn spare(&mut self) -> io::Result<&mut [u8]> {
        self.out.spare()
    }

    /// Marks `n` bytes of [`Encoder::spare`] as part of the NAR.
    fn commit(&mut self, n: usize) {
        self.out.commit(n);
        self.written += n as u64;
    }
}

/// A directory being archived: its entry names, sorted, and the next one to visit.
struct DirFrame {
    /// Entry names, each with its inode number when the directory listing says it is a
    /// regular file (see [`Dumper::regular_entry`]).
    names: Vec<(OsString, Option<u64>)>,
    next: usize,
    /// Length of the directory's path in [`Dumper::path`].
    path_len: usize,
}

/// The state of one [`dump_path`] walk. The walk is iterative, so depth costs heap, not
/// stack: a tree as deep as the file system allows cannot overflow a small thread stack.
struct Dumper<'a, B: NarBuffer + ?Sized> {
    enc: Encoder<'a, B>,
    /// The path of the current node, as bytes, reused for every entry.
    path: Vec<u8>,
    /// The directories from the root to the current node.
    stack: Vec<DirFrame>,
    /// Emptied name lists, reused so a walk allocates one per depth, not per directory.
    spare_lists: Vec<Vec<(OsString, Option<u64>)>>,
    /// Given each node as it is written, when the caller wants the NAR's listing.
    listing: Option<&'a mut ListingBuilder>,
}

impl<B: NarBuffer + ?Sized> Dumper<'_, B> {
    fn run(&mut self) -> Result<(), NarWriteError> {
        self.enc.string(NAR_MAGIC).map_err(NarWriteError::Write)?;
        self.node()?;
        while let Some(frame) = self.stack.last_mut() {
            if let Some(name) = frame.names.get_mut(frame.next) {
                frame.next += 1;
                let (name, regular_ino) = std::mem::take(name);
                self.path.truncate(frame.path_len);
                if self.path.last() != Some(&b'/') {
                    self.path.push(b'/');
                }
                self.path.extend_from_slice(name.as_bytes());
                self.enc
                    .entry_header(name.as_bytes())
                    .map_err(NarWriteError::Write)?;
                if let Some(l) = self.listing.as_deref_mut() {
                    l.open_entry(name.as_bytes());
                }
                // A complete node (not a directory left open) closes its entry here.
                let complete = match regular_ino {
                    Some(ino) if self.regular_entry(ino)? => true,
                    _ => !self.node()?,
                };
                if complete {
                    self.enc.string(b")").map_err(NarWriteError::Write)?;
                    if let Some(l) = self.listing.as_deref_mut() {
                        l.close_entry();
                    }
                }
            } else {
                let mut frame = self.stack.pop().expect("stack is not empty");
                frame.names.clear();
                self.spare_lists.push(frame.names);
                // Close the directory node and, below the root, the entry holding it.
                let close: &[&[u8]] = if self.stack.is_empty() {
                    &[b")"]
                } else {
                    &[b")", b")"]
                };
                self.enc.strings(close).map_err(NarWriteError::Write)?;
                if let Some(l) = self.listing.as_deref_mut() {
                    l.close_directory();
                    if !self.stack.is_empty() {
                        l.close_entry();
                    }
                }
            }
        }
        Ok(())
    }

    fn current_path(&self) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(&self.path))
    }

    fn read_error(&self, source: io::Error) -> NarWriteError {
        NarWriteError::Read {
            path: self.current_path(),
            source,
        }
    }

    /// Archives the node at `self.path`. A directory is opened (its header written and its
    /// frame pushed, returning `true`); any other node is written completely.
    fn node(&mut self) -> Result<bool, NarWriteError> {
        let path = OsStr::from_bytes(&self.path);
        let meta = fs::symlink_metadata(path).map_err(|e| self.read_error(e))?;
        let file_type = meta.file_type();
        if file_type.is_file() {
            self.regular(&meta)?;
            Ok(false)
        } else if file_type.is_dir() {
            self.directory()?;
            Ok(true)
        } else if file_type.is_symlink() {
            let target = fs::read_link(path).map_err(|e| self.read_error(e))?;
            self.enc
                .symlink(target.as_os_str().as_bytes())
                .map_err(NarWriteError::Write)?;
            if let Some(l) = self.listing.as_deref_mut() {
                l.symlink(target.as_os_str().as_bytes());
            }
            Ok(false)
        } else {
            Err(NarWriteError::UnsupportedFileType {
                path: self.current_path(),
            })
        }
    }

    fn directory(&mut self) -> Result<(), NarWriteError> {
        let mut names = self.spare_lists.pop().unwrap_or_default();
        let entries =
            fs::read_dir(OsStr::from_bytes(&self.path)).map_err(|e| self.read_error(e))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.read_error(e))?;
            // The listing's type (d_type) costs no system call; when it is unknown,
            // file_type() would lstat, so leave the entry to `node`.
            let regular_ino = entry
                .file_type()
                .ok()
                .filter(fs::FileType::is_file)
                .map(|_| entry.ino());
            names.push((entry.file_name(), regular_ino));
        }
        // read_dir never yields `.` or `..`, and names in one directory are unique.
        names.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        self.stack.push(DirFrame {
            names,
            next: 0,
            path_len: self.path.len(),
        });
        if let Some(l) = self.listing.as_deref_mut() {
            l.open_directory();
        }
        self.enc
            .strings(&[b"(", b"type", b"directory"])
            .map_err(NarWriteError::Write)
    }

    /// Archives the entry at `self.path` that the directory listing says is the regular
    /// file with inode `ino`, without the lstat `node` makes: one path lookup (the open)
    /// instead of two, which counts in trees of many small files. The opened file's fstat
    /// must show a regular file with that inode; otherwise the entry changed since the
    /// listing (e.g. it is now a symlink, which open would have followed) and this returns
    /// `false` without writing anything, for `node` to archive it.
    fn regular_entry(&mut self, ino: u64) -> Result<bool, NarWriteError> {
        let file = match File::open(OsStr::from_bytes(&self.path)) {
            Ok(f) => f,
            Err(_) => return Ok(false),
        };
        let meta = file.metadata().map_err(|e| self.read_error(e))?;
        if !meta.is_file() || meta.ino() != ino {
            return Ok(false);
        }
        self.regular_from(file, &meta)?;
        Ok(true)
    }

    /// Streams a regular file through the encoder's buffer: read() lands in the buffer, and
    /// the buffer goes to `out` whenever it is full.
    fn regular(&mut self, meta: &Metadata) -> Result<(), NarWriteError> {
        let file = File::open(OsStr::from_bytes(&self.path)).map_err(|e| self.read_error(e))?;
        self.regular_from(file, meta)
    }

    /// Writes the regular file `file`, whose metadata is `meta`, as a complete node (without
    /// the closing parenthesis of the entry holding it).
    fn regular_from(&mut self, mut file: File, meta: &Metadata) -> Result<(), NarWriteError> {
        let size = meta.len();
        let executable = meta.mode() & 0o100 != 0;
        self.enc
            .regular_header(executable, size)
            .map_err(NarWriteError::Write)?;
        if let Some(l) = self.listing.as_deref_mut() {
            l.regular(executable, size);
        }
        let mut remaining = size;
        loop {
            let spare = self.enc.spare().map_err(NarWriteError::Write)?;
            let asked = spare.len();
            let n = match file.read(spare) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e)),
            };
            if n as u64 > remaining {
                return Err(NarWriteError::FileChanged {
                    path: self.current_path(),
                    expected: size,
                    actual: size - remaining + n as u64,
                });
            }
            if n == 0 {
                if remaining > 0 {
                    return Err(NarWriteError::FileChanged {
                        path: self.current_path(),
                        expected: size,
                        actual: size - remaining,
                    });
                }
                break;
            }
            self.enc.commit(n);
            remaining -= n as u64;
            // A short read of a regular file means end of file, which saves the extra
            // read() that would otherwise confirm it for every small file. After a full
            // read, the loop reads once more and expects 0.
            if remaining == 0 && n < asked {
                break;
            }
        }
        self.enc.padding(size).map_err(NarWriteError::Write)?;
        self.enc.string(b")").map_err(NarWriteError::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::nar;
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn node_bytes(node: &Node) -> Vec<u8> {
        let mut out = Vec::new();
        let n = write_node(node, &mut out).unwrap();
        assert_eq!(n, out.len() as u64);
        out
    }

    fn dump_bytes(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        let n = dump_path(path, &mut out).unwrap();
        assert_eq!(n, out.len() as u64);
        out
    }

    fn regular(executable: bool, contents: &[u8]) -> Node {
        Node::Regular {
            executable,
            contents: contents.to_vec(),
        }
    }

    fn write_file(path: &Path, contents: &[u8], mode: u32) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn golden_empty_regular_file() {
        let want = nar(&[b"(", b"type", b"regular", b"contents", b"", b")"]);
        // The string helper is independent of the encoder: spell the first bytes out.
        assert_eq!(&want[..8], &13u64.to_le_bytes());
        assert_eq!(&want[8..24], b"nix-archive-1\0\0\0");
        assert_eq!(want.len(), 24 + 5 * 16 + 8);
        assert_eq!(node_bytes(&regular(false, b"")), want);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_file(&path, b"", 0o644);
        assert_eq!(dump_bytes(&path), want);
    }

    #[test]
    fn golden_regular_file_with_padding() {
        let want = nar(&[b"(", b"type", b"regular", b"contents", b"hello", b")"]);
        assert!(
            want.windows(16)
                .any(|w| w == b"\x05\0\0\0\0\0\0\0hello\0\0\0")
        );
        assert_eq!(node_bytes(&regular(false, b"hello")), want);
    }

    #[test]
    fn golden_executable() {
        let want = nar(&[
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"#!/bin/sh\n",
            b")",
        ]);
        assert_eq!(node_bytes(&regular(true, b"#!/bin/sh\n")), want);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        write_file(&path, b"#!/bin/sh\n", 0o755);
        assert_eq!(dump_bytes(&path), want);
    }

    #[test]
    fn executable_means_owner_x_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let exec = nar(&[
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"x",
            b")",
        ]);
        let plain = nar(&[b"(", b"type", b"regular", b"contents", b"x", b")"]);
        for (mode, want) in [
            (0o100, &exec),
            (0o700, &exec),
            (0o011, &plain),
            (0o644, &plain),
        ] {
            write_file(&path, b"x", mode);
            assert_eq!(dump_bytes(&path), *want, "mode {mode:o}");
        }
    }

    #[test]
    fn golden_symlink() {
        let want = nar(&[
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"../some/target",
            b")",
        ]);
        assert_eq!(
            node_bytes(&Node::Symlink {
                target: b"../some/target".to_vec()
            }),
            want
        );

        // The root symlink is archived itself, never followed (here it even dangles).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        symlink("../some/target", &path).unwrap();
        assert_eq!(dump_bytes(&path), want);
    }

    #[test]
    fn golden_empty_directory() {
        let want = nar(&[b"(", b"type", b"directory", b")"]);
        assert_eq!(node_bytes(&Node::Directory(BTreeMap::new())), want);

        let dir = tempfile::tempdir().unwrap();
        assert_eq!(dump_bytes(dir.path()), want);
    }

    #[test]
    fn golden_directory_sorted_bytewise() {
        let mut tokens: Vec<&[u8]> = vec![b"(", b"type", b"directory"];
        // Bytewise order, unlike any locale's collation.
        let names: [&[u8]; 6] = [b"B", b"Z", b"_", b"a", "é".as_bytes(), b"\xff\xfe"];
        for name in names {
            tokens.extend_from_slice(&[b"entry", b"(", b"name", name, b"node"]);
            tokens.extend_from_slice(&[b"(", b"type", b"regular", b"contents", name, b")"]);
            tokens.push(b")");
        }
        tokens.push(b")");
        let want = nar(&tokens);

        let tree = Node::Directory(
            names
                .iter()
                .map(|n| (n.to_vec(), regular(false, n)))
                .collect(),
        );
        assert_eq!(node_bytes(&tree), want);

        let dir = tempfile::tempdir().unwrap();
        for name in names.iter().rev() {
            write_file(&dir.path().join(OsStr::from_bytes(name)), name, 0o644);
        }
        assert_eq!(dump_bytes(dir.path()), want);
    }

    #[test]
    fn nested_directories_and_trailing_slash() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir_all(root.join("a/d")).unwrap();
        write_file(&root.join("a/b/c/f"), b"deep", 0o644);
        write_file(&root.join("a/b/g"), b"", 0o755);
        symlink("/abs/olute", root.join("a/d/l")).unwrap();
        write_file(&root.join("z"), b"last", 0o644);

        let dirn = |entries: Vec<(&str, Node)>| {
            Node::Directory(
                entries
                    .into_iter()
                    .map(|(n, c)| (n.as_bytes().to_vec(), c))
                    .collect(),
            )
        };
        let tree = dirn(vec![
            (
                "a",
                dirn(vec![
                    (
                        "b",
                        dirn(vec![
                            ("c", dirn(vec![("f", regular(false, b"deep"))])),
                            ("g", regular(true, b"")),
                        ]),
                    ),
                    (
                        "d",
                        dirn(vec![(
                            "l",
                            Node::Symlink {
                                target: b"/abs/olute".to_vec(),
                            },
                        )]),
                    ),
                ]),
            ),
            ("z", regular(false, b"last")),
        ]);
        let want = node_bytes(&tree);
        assert_eq!(dump_bytes(&root), want);
        let mut with_slash = root.into_os_string();
        with_slash.push("/");
        assert_eq!(dump_bytes(Path::new(&with_slash)), want);
    }

    #[test]
    fn contents_around_buffer_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut tree = BTreeMap::new();
        for size in [
            NODE_BUFFER_SIZE - 1,
            NODE_BUFFER_SIZE + 3,
            DUMP_BUFFER_SIZE - 200,
            DUMP_BUFFER_SIZE - 1,
            DUMP_BUFFER_SIZE,
            DUMP_BUFFER_SIZE + 1,
            3 * DUMP_BUFFER_SIZE + 5,
        ] {
            let contents: Vec<u8> = (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let name = format!("f{size}");
            write_file(&dir.path().join(&name), &contents, 0o644);
            tree.insert(name.into_bytes(), regular(false, &contents));
        }
        assert_eq!(dump_bytes(dir.path()), node_bytes(&Node::Directory(tree)));
    }

    /// Counts write calls, to check small tokens are batched for an unbuffered `out`.
    struct CountingWriter {
        calls: usize,
        bytes: Vec<u8>,
    }

    impl Write for CountingWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            // Accept at most 1000 bytes per call, like a pipe might.
            let n = buf.len().min(1000);
            self.bytes.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn small_writes_are_batched() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..500 {
            write_file(
                &dir.path().join(format!("file{i:03}")),
                format!("contents {i}").as_bytes(),
                0o644,
            );
        }
        let mut out = CountingWriter {
            calls: 0,
            bytes: Vec::new(),
        };
        let size = dump_path(dir.path(), &mut out).unwrap();
        assert_eq!(size, out.bytes.len() as u64);
        assert!(size > 500 * 100);
        // One call per 1000 bytes accepted, plus a final partial one.
        assert!(
            out.calls <= out.bytes.len() / 1000 + 1,
            "{} calls",
            out.calls
        );
        assert_eq!(out.bytes, dump_bytes(dir.path()));
    }

    #[test]
    fn write_errors_are_write_errors() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        match dump_path(dir.path(), &mut Broken) {
            Err(NarWriteError::Write(e)) => assert!(e.to_string().contains("disk on fire")),
            other => panic!("{other:?}"),
        }
        assert!(write_node(&regular(false, b"x"), &mut Broken).is_err());
    }

    #[test]
    fn missing_root_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope");
        match dump_path(&path, &mut io::sink()) {
            Err(NarWriteError::Read { path: p, source }) => {
                assert_eq!(p, path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn socket_is_unsupported_and_named() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("d")).unwrap();
        let sock = dir.path().join("d").join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = dump_path(dir.path(), &mut io::sink()).unwrap_err();
        match &err {
            NarWriteError::UnsupportedFileType { path } => assert_eq!(path, &sock),
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().contains("sock: unsupported file type"),
            "{err}"
        );
    }

    #[test]
    fn file_longer_than_its_metadata_size_is_detected() {
        // procfs reports size 0 for files that do have contents.
        let path = Path::new("/proc/self/status");
        match dump_path(path, &mut io::sink()) {
            Err(NarWriteError::FileChanged {
                path: p,
                expected: 0,
                actual,
            }) => {
                assert_eq!(p, path);
                assert!(actual > 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn write_node_rejects_invalid_names() {
        for name in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            let tree = Node::Directory(BTreeMap::from([(name.to_vec(), regular(false, b""))]));
            let err = write_node(&tree, &mut io::sink()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }
}
