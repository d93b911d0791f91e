//! The NAR walker: archives a tree on the file system as a NAR ([`dump_path`]), hashes
//! it as Nix does ([`hash_path`]), lists it ([`list_path`]), and restores a [`Node`] on
//! disk ([`restore`]).
//!
//! This is the hot path of narflow: every byte uploaded passes through [`dump_path`]. The
//! bytes themselves come from the pure encoder in [`crate::format::nar::writer`]; this
//! module owns only the reading. It must never follow a symlink, never mmap a file (a file
//! truncated under a mapping raises SIGBUS), and never hold memory that grows with file
//! size: file contents are read with read() straight into the encoder's buffer.
use crate::format::nar::listing::{ListingBuilder, NarListing};
use crate::format::nar::writer::{BufferedOut, Encoder, NarBuffer};
use crate::format::nar::{NAR_MAGIC, Node, check_entry_name};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Buffer of [`dump_path`]: file contents are read into it and written out from it.
/// 256 KiB keeps it in L2 cache while making read()/write() overhead negligible.
pub(crate) const DUMP_BUFFER_SIZE: usize = 256 * 1024;

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
/// written, so the NAR's listing ([`crate::format::nar::listing`]) comes with no system
/// call of its own. On error the listing is incomplete and must be dropped.
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
            dumper.enc.written(),
            "listing and NAR disagree"
        );
    }
    Ok(dumper.enc.written())
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

/// Why a tree could not be listed. Each variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    /// Reading the file system's metadata failed at `path`.
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// `path` is neither a regular file, a directory nor a symlink.
    #[error(
        "{path}: unsupported file type (only regular files, directories and symlinks can be archived)"
    )]
    UnsupportedFileType { path: PathBuf },
}

/// Lists the tree at `path` (not followed when it is a symlink) as the NAR that
/// [`dump_path`] makes of it, reading only metadata.
///
/// # Errors
/// [`ListingError::Read`] naming what could not be read; [`ListingError::UnsupportedFileType`]
/// naming a socket, fifo or device.
pub fn list_path(path: &Path) -> Result<NarListing, ListingError> {
    let mut b = ListingBuilder::new();
    let mut stack = Vec::new();
    list_one(&mut b, path, &mut stack)?;
    while let Some(dir) = stack.last_mut() {
        match dir.names.get(dir.next) {
            Some((name, Seen::Regular { executable, size })) => {
                dir.next += 1;
                b.open_entry(name.as_bytes());
                b.regular(*executable, *size);
                b.close_entry();
            }
            Some((name, Seen::Other)) => {
                dir.next += 1;
                b.open_entry(name.as_bytes());
                let child = dir.path.join(name);
                let depth = stack.len();
                list_one(&mut b, &child, &mut stack)?;
                if stack.len() == depth {
                    b.close_entry(); // not a directory: complete already
                }
            }
            None => {
                stack.pop();
                b.close_directory();
                if !stack.is_empty() {
                    b.close_entry();
                }
            }
        }
    }
    Ok(b.finish())
}

/// What reading a directory told of one of its entries.
enum Seen {
    /// A regular file, whose metadata was read relative to the open directory (no path
    /// lookup): in trees of many small files, that is most of the work.
    Regular { executable: bool, size: u64 },
    /// Anything else, looked at by its path when its turn comes.
    Other,
}

/// A directory [`list_path`] is in: its entries, sorted bytewise by name, and the next.
struct OpenDir {
    path: PathBuf,
    names: Vec<(OsString, Seen)>,
    next: usize,
}

/// Lists the node at `path`; a directory is opened and pushed, and its entries follow.
fn list_one(
    b: &mut ListingBuilder,
    path: &Path,
    stack: &mut Vec<OpenDir>,
) -> Result<(), ListingError> {
    let read = |source| ListingError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(read)?;
    let file_type = meta.file_type();
    if file_type.is_file() {
        b.regular(meta.mode() & 0o100 != 0, meta.len());
    } else if file_type.is_symlink() {
        let target = fs::read_link(path).map_err(read)?;
        b.symlink(target.as_os_str().as_bytes());
    } else if file_type.is_dir() {
        let mut names = Vec::new();
        for entry in fs::read_dir(path).map_err(read)? {
            let entry = entry.map_err(read)?;
            // The listing's type (d_type) costs no system call; the metadata of a regular
            // file is then read relative to the directory, never following a symlink.
            let seen = match entry.file_type() {
                Ok(t) if t.is_file() => match entry.metadata() {
                    Ok(m) if m.is_file() => Seen::Regular {
                        executable: m.mode() & 0o100 != 0,
                        size: m.len(),
                    },
                    _ => Seen::Other,
                },
                _ => Seen::Other,
            };
            names.push((entry.file_name(), seen));
        }
        names.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        b.open_directory();
        stack.push(OpenDir {
            path: path.to_owned(),
            names,
            next: 0,
        });
    } else {
        return Err(ListingError::UnsupportedFileType {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Creates the tree on disk at `path`, which must not exist: files with mode 0644 (0755
/// when executable), symlinks as they are, directories in entry order. What
/// [`dump_path`] reads back is this node.
///
/// # Errors
/// The first file system error, or [`std::io::ErrorKind::InvalidInput`] for an entry
/// name that breaks the NAR rules (it could name a path outside `path`); the entries
/// created before it stay.
pub fn restore(node: &Node, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    match node {
        Node::Regular {
            executable,
            contents,
        } => {
            std::fs::write(path, contents)?;
            let mode = if *executable { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        }
        Node::Symlink { target } => {
            std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), path)
        }
        Node::Directory(entries) => {
            std::fs::create_dir(path)?;
            for (name, child) in entries {
                check_entry_name(name).map_err(|why| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("invalid NAR entry name \"{}\": {why}", name.escape_ascii()),
                    )
                })?;
                restore(child, &path.join(std::ffi::OsStr::from_bytes(name)))?;
            }
            Ok(())
        }
    }
}
