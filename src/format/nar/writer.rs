//! NAR encoder: writes the NAR grammar's tokens into a [`NarBuffer`] or any `Write`, and
//! serialises an in-memory [`Node`].
//!
//! Pure and synchronous: it never touches the file system. A walker of trees on disk
//! drives the same [`Encoder`], so a tree on disk and the same tree in memory make the
//! same bytes. It never holds memory that grows with file size: large contents pass
//! through to the output in large slices.
use super::{NAR_MAGIC, Node, check_entry_name, padding_len};
use std::io::{self, Write};

/// Buffer of [`write_node`]: it only batches tokens and small files (large contents are
/// written straight from the `Node`), so it is kept small for the fuzzer's many calls.
const NODE_BUFFER_SIZE: usize = 16 * 1024;

/// Memory the NAR encoder writes into in place: it asks for writable space and says how
/// much of it it used, so a walker of trees on disk can read file contents straight
/// into it.
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

/// A fixed buffer in front of a `Write`: the [`NarBuffer`] of [`write_node`] (and of a
/// walker of trees on disk), so `out` sees few, large writes.
pub struct BufferedOut<'a, W: Write> {
    out: &'a mut W,
    buf: Box<[u8]>,
    /// Bytes of `buf` not yet written to `out`.
    filled: usize,
}

impl<W: Write> std::fmt::Debug for BufferedOut<'_, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferedOut")
            .field("capacity", &self.buf.len())
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

impl<'a, W: Write> BufferedOut<'a, W> {
    pub fn new(out: &'a mut W, capacity: usize) -> Self {
        debug_assert!(capacity >= 64, "tokens must fit the buffer");
        BufferedOut {
            out,
            buf: vec![0; capacity].into_boxed_slice(),
            filled: 0,
        }
    }

    /// Writes the buffered bytes to `out`.
    pub fn flush(&mut self) -> io::Result<()> {
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

/// Serialises an in-memory tree as a NAR to `out`, returning the NAR size in bytes.
///
/// It batches small writes internally and does not flush `out`.
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
pub struct Encoder<'a, B: NarBuffer + ?Sized> {
    out: &'a mut B,
    /// Bytes of NAR so far.
    written: u64,
}

impl<B: NarBuffer + ?Sized> std::fmt::Debug for Encoder<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

impl<'a, B: NarBuffer + ?Sized> Encoder<'a, B> {
    pub fn new(out: &'a mut B) -> Self {
        Encoder { out, written: 0 }
    }

    /// Bytes of NAR so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends bytes as they are (no length, no padding).
    pub fn raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.append(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Appends the zero padding that follows a string of `len` bytes.
    pub fn padding(&mut self, len: u64) -> io::Result<()> {
        self.raw(&[0; 8][..padding_len(len)])
    }

    pub fn u64(&mut self, n: u64) -> io::Result<()> {
        self.raw(&n.to_le_bytes())
    }

    /// Appends one NAR string: length, bytes, padding.
    pub fn string(&mut self, s: &[u8]) -> io::Result<()> {
        self.u64(s.len() as u64)?;
        self.raw(s)?;
        self.padding(s.len() as u64)
    }

    pub fn strings(&mut self, ss: &[&[u8]]) -> io::Result<()> {
        ss.iter().try_for_each(|s| self.string(s))
    }

    /// Everything of a regular file node up to its contents, including the length prefix.
    pub fn regular_header(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.strings(&[b"(", b"type", b"regular"])?;
        if executable {
            self.strings(&[b"executable", b""])?;
        }
        self.string(b"contents")?;
        self.u64(size)
    }

    /// A whole symlink node.
    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.strings(&[b"(", b"type", b"symlink", b"target", target, b")"])
    }

    /// Everything of a directory entry up to its node.
    pub fn entry_header(&mut self, name: &[u8]) -> io::Result<()> {
        self.strings(&[b"entry", b"(", b"name", name, b"node"])
    }

    /// Writable space for the NAR's next bytes; never empty.
    pub fn spare(&mut self) -> io::Result<&mut [u8]> {
        self.out.spare()
    }

    /// Marks `n` bytes of [`Encoder::spare`] as part of the NAR.
    pub fn commit(&mut self, n: usize) {
        self.out.commit(n);
        self.written += n as u64;
    }
}

#[cfg(test)]
mod tests {
    //! The encoder's golden bytes, and the walker's: a tree on disk and the same tree in
    //! memory must make the same NAR.
    use super::super::tests::nar;
    use super::*;
    use crate::nar_fs::*;
    use std::collections::BTreeMap;
    use std::ffi::OsStr;
    use std::fs;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::Path;

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
