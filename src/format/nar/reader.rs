//! Strict, streaming NAR reader. Rejects anything real Nix would not produce: unsorted or
//! duplicate entries, bad names, non-zero padding, trailing bytes, absurd lengths (never
//! allocated up front).
//!
//! It owns the NAR grammar on the reading side, and must never let the input decide how
//! much memory or stack it uses: names and symlink targets are capped ([`MAX_NAME_LEN`], [`MAX_TARGET_LEN`])
//! before anything is allocated, file contents are streamed to the visitor, and directory
//! nesting is capped ([`MAX_DEPTH`]) and walked without recursion.
use super::{NAR_MAGIC, Node, check_entry_name, padding_len};
use std::collections::BTreeMap;
use std::io::{self, BufReader, Read};

/// Longest entry name accepted, in bytes. Linux allows 255 (NAME_MAX); Nix sets no limit,
/// so this leaves room for other systems' longer encodings while refusing absurd lengths
/// before allocating them.
pub const MAX_NAME_LEN: usize = 4096;

/// Longest symlink target accepted, in bytes: Linux's PATH_MAX (a target is at most
/// PATH_MAX - 1 bytes there).
pub const MAX_TARGET_LEN: usize = 4096;

/// Deepest directory nesting accepted: an entry at more than this many names below the
/// root is rejected. Real store paths stay far below it.
pub const MAX_DEPTH: usize = 1024;

/// Longest token of the grammar ("nix-archive-1" has 13 bytes): a longer string where a
/// token is expected is rejected without being read.
const MAX_TOKEN_LEN: usize = 16;

/// Size of the buffer put in front of the input, so the many 8-byte reads of tokens do
/// not each become a read() on an unbuffered input.
const READ_BUFFER_SIZE: usize = 64 * 1024;

/// Why a NAR could not be read. [`NarReadError::Malformed`] is bad input: retrying the
/// same bytes cannot help.
#[derive(Debug, thiserror::Error)]
pub enum NarReadError {
    /// Reading the input failed, or the visitor returned this error.
    #[error("NAR read: {0}")]
    Io(#[from] io::Error),
    /// The NAR is malformed at byte `offset` (counted from the start of the NAR); `reason`
    /// says what was wrong or missing. Truncated input is reported as malformed, with a
    /// reason starting with "truncated".
    #[error("malformed NAR at byte {offset}: {reason}")]
    Malformed { offset: u64, reason: String },
}

/// Callbacks for [`parse`]. Paths are the entry names from the root, as bytes: the root is
/// the empty path. Nodes arrive in NAR order (depth first, entries sorted); a directory is
/// announced before its entries.
pub trait NarVisitor {
    /// A directory starts at `path`; its entries follow.
    ///
    /// # Errors
    /// An error stops the parse and is returned as [`NarReadError::Io`].
    fn directory(&mut self, path: &[&[u8]]) -> io::Result<()>;

    /// A symlink at `path` pointing to `target` (raw bytes, at most [`MAX_TARGET_LEN`]).
    ///
    /// # Errors
    /// An error stops the parse and is returned as [`NarReadError::Io`].
    fn symlink(&mut self, path: &[&[u8]], target: &[u8]) -> io::Result<()>;

    /// A regular file at `path` of `size` bytes, readable from `contents`, which ends after
    /// `size` bytes (or earlier when the input is truncated; the parser then fails with
    /// [`NarReadError::Malformed`] whatever this returns). Contents left unread are
    /// skipped by the parser, so a visitor that does not need them may ignore `contents`.
    ///
    /// # Errors
    /// An error stops the parse and is returned as [`NarReadError::Io`].
    fn regular(
        &mut self,
        path: &[&[u8]],
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<()>;
}

/// Parses one NAR from `r`, calling `v` for each node; returns the NAR size. Fails on
/// trailing bytes after the NAR, so it reads `r` to its end; `r` need not be buffered.
///
/// # Errors
/// [`NarReadError::Malformed`] with the byte offset and the reason when the input is not
/// a canonical NAR (including when it is truncated); [`NarReadError::Io`] when `r` or the
/// visitor fails.
pub fn parse<R: Read, V: NarVisitor>(r: R, v: &mut V) -> Result<u64, NarReadError> {
    let mut parser = Parser {
        input: Input {
            r: BufReader::with_capacity(READ_BUFFER_SIZE, r),
            offset: 0,
        },
        names: Vec::new(),
        dirs: Vec::new(),
    };
    parser.input.magic()?;
    parser.run(v)?;
    parser.input.end()?;
    Ok(parser.input.offset)
}

/// Parses one NAR into memory. For tests, the fuzzer and small NARs: memory grows with the
/// bytes actually read, never with lengths the input declares.
///
/// # Errors
/// As [`parse`].
pub fn read_tree<R: Read>(r: R) -> Result<Node, NarReadError> {
    let mut builder = TreeBuilder {
        root: None,
        open: Vec::new(),
    };
    parse(r, &mut builder)?;
    Ok(builder.finish())
}

/// The input with the count of bytes consumed, for error offsets and the NAR size.
struct Input<R> {
    r: BufReader<R>,
    offset: u64,
}

impl<R: Read> Input<R> {
    fn malformed(at: u64, reason: impl Into<String>) -> NarReadError {
        NarReadError::Malformed {
            offset: at,
            reason: reason.into(),
        }
    }

    fn exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), NarReadError> {
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Self::malformed(
                self.offset,
                format!("truncated: input ends in {what}"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    fn u64(&mut self, what: &str) -> Result<u64, NarReadError> {
        let mut b = [0; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads and checks the zero padding after a string of `len` bytes.
    fn padding(&mut self, len: u64, what: &str) -> Result<(), NarReadError> {
        let mut pad = [0; 8];
        let pad = &mut pad[..padding_len(len)];
        let start = self.offset;
        self.exact(pad, &format!("the padding of {what}"))?;
        match pad.iter().position(|&b| b != 0) {
            None => Ok(()),
            Some(i) => Err(Self::malformed(
                start + i as u64,
                format!("non-zero padding byte {:#04x} after {what}", pad[i]),
            )),
        }
    }

    /// Reads a token and returns its index in `expected`.
    fn token(&mut self, expected: &[&[u8]]) -> Result<usize, NarReadError> {
        let start = self.offset;
        let list = || {
            let quoted: Vec<String> = expected
                .iter()
                .map(|t| format!("\"{}\"", t.escape_ascii()))
                .collect();
            quoted.join(" or ")
        };
        let len = self.u64("a token")?;
        if len > MAX_TOKEN_LEN as u64 {
            return Err(Self::malformed(
                start,
                format!(
                    "unknown token: a string of {len} bytes where {} was expected",
                    list()
                ),
            ));
        }
        let mut buf = [0; MAX_TOKEN_LEN];
        let token = &mut buf[..len as usize];
        self.exact(token, "a token")?;
        self.padding(len, "a token")?;
        match expected.iter().position(|t| *t == &*token) {
            Some(i) => Ok(i),
            None => Err(Self::malformed(
                start,
                format!(
                    "unknown token \"{}\" where {} was expected",
                    token.escape_ascii(),
                    list()
                ),
            )),
        }
    }

    fn expect(&mut self, token: &'static [u8]) -> Result<(), NarReadError> {
        self.token(&[token]).map(|_| ())
    }

    /// Reads a string of at most `max` bytes; a longer one is rejected before allocating.
    fn bytes(&mut self, max: usize, what: &str) -> Result<Vec<u8>, NarReadError> {
        let start = self.offset;
        let len = self.u64(what)?;
        if len > max as u64 {
            return Err(Self::malformed(
                start,
                format!("{what} too long: {len} bytes, at most {max} allowed"),
            ));
        }
        let mut buf = vec![0; len as usize];
        self.exact(&mut buf, what)?;
        self.padding(len, what)?;
        Ok(buf)
    }

    fn magic(&mut self) -> Result<(), NarReadError> {
        let len = self.u64("the magic")?;
        if len != NAR_MAGIC.len() as u64 {
            return Err(Self::malformed(
                0,
                "bad magic: not a NAR (expected \"nix-archive-1\")",
            ));
        }
        let mut buf = [0; NAR_MAGIC.len()];
        self.exact(&mut buf, "the magic")?;
        if buf != NAR_MAGIC {
            return Err(Self::malformed(
                0,
                format!(
                    "bad magic \"{}\": not a NAR (expected \"nix-archive-1\")",
                    buf.escape_ascii()
                ),
            ));
        }
        self.padding(len, "the magic")
    }

    /// Checks the input ends here by trying to read one more byte.
    fn end(&mut self) -> Result<(), NarReadError> {
        let mut b = [0];
        loop {
            return match self.r.read(&mut b) {
                Ok(0) => Ok(()),
                Ok(_) => Err(Self::malformed(
                    self.offset,
                    "trailing bytes after the end of the NAR",
                )),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e.into()),
            };
        }
    }
}

/// File contents handed to the visitor: the input limited to the file's size.
struct Contents<'a, R> {
    input: &'a mut Input<R>,
    remaining: u64,
    truncated: bool,
}

impl<R: Read> Read for Contents<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.input.r.read(&mut buf[..max])?;
        if n == 0 {
            self.truncated = true;
        }
        self.input.offset += n as u64;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// An open directory: the name of its last entry, to check the next one sorts after it.
struct DirState {
    last: Option<Vec<u8>>,
}

struct Parser<R> {
    input: Input<R>,
    /// Names from the root to the current node.
    names: Vec<Vec<u8>>,
    /// Open directories from the root; the innermost is last.
    dirs: Vec<DirState>,
}

impl<R: Read> Parser<R> {
    /// Parses the root node and then the entries of open directories, iteratively so that
    /// nesting costs heap (bounded by [`MAX_DEPTH`]), not stack.
    fn run<V: NarVisitor>(&mut self, v: &mut V) -> Result<(), NarReadError> {
        self.node(v)?;
        while !self.dirs.is_empty() {
            if self.input.token(&[b"entry", b")"])? == 1 {
                self.dirs.pop();
                if !self.dirs.is_empty() {
                    self.end_entry()?;
                }
                continue;
            }
            self.input.expect(b"(")?;
            self.input.expect(b"name")?;
            let start = self.input.offset;
            let name = self.input.bytes(MAX_NAME_LEN, "an entry name")?;
            if let Err(why) = check_entry_name(&name) {
                return Err(Input::<R>::malformed(
                    start,
                    format!("invalid entry name \"{}\": {why}", name.escape_ascii()),
                ));
            }
            let dir = self.dirs.last().expect("a directory is open");
            if let Some(last) = &dir.last {
                if name == *last {
                    return Err(Input::<R>::malformed(
                        start,
                        format!("duplicate entry \"{}\"", name.escape_ascii()),
                    ));
                }
                if name < *last {
                    return Err(Input::<R>::malformed(
                        start,
                        format!(
                            "entries not sorted: \"{}\" after \"{}\"",
                            name.escape_ascii(),
                            last.escape_ascii()
                        ),
                    ));
                }
            }
            self.input.expect(b"node")?;
            if self.names.len() >= MAX_DEPTH {
                return Err(Input::<R>::malformed(
                    start,
                    format!("directories nested too deep (more than {MAX_DEPTH} levels)"),
                ));
            }
            self.names.push(name);
            if !self.node(v)? {
                self.end_entry()?;
            }
        }
        Ok(())
    }

    /// Reads the `)` closing the current entry and makes its name the directory's last.
    fn end_entry(&mut self) -> Result<(), NarReadError> {
        self.input.expect(b")")?;
        let name = self.names.pop().expect("an entry is open");
        self.dirs.last_mut().expect("a directory is open").last = Some(name);
        Ok(())
    }

    /// Parses a node at `self.names`. A directory is only opened (returns `true`: its
    /// entries and closing `)` are left to [`Parser::run`]); other nodes are read whole.
    fn node<V: NarVisitor>(&mut self, v: &mut V) -> Result<bool, NarReadError> {
        self.input.expect(b"(")?;
        self.input.expect(b"type")?;
        let kind = self.input.token(&[b"regular", b"symlink", b"directory"])?;
        let path: Vec<&[u8]> = self.names.iter().map(Vec::as_slice).collect();
        match kind {
            0 => {
                let executable = self.input.token(&[b"executable", b"contents"])? == 0;
                if executable {
                    self.input.expect(b"")?;
                    self.input.expect(b"contents")?;
                }
                let size = self.input.u64("a file size")?;
                let mut contents = Contents {
                    input: &mut self.input,
                    remaining: size,
                    truncated: false,
                };
                let visited = v.regular(&path, executable, size, &mut contents);
                if !contents.truncated {
                    // Skip what the visitor left unread (an error here is the input's).
                    visited?;
                    io::copy(&mut contents, &mut io::sink())?;
                }
                if contents.truncated {
                    let missing = contents.remaining;
                    return Err(Input::<R>::malformed(
                        self.input.offset,
                        format!(
                            "truncated: input ends in file contents ({missing} of {size} bytes missing)"
                        ),
                    ));
                }
                self.input.padding(size, "file contents")?;
            }
            1 => {
                self.input.expect(b"target")?;
                let target = self.input.bytes(MAX_TARGET_LEN, "a symlink target")?;
                v.symlink(&path, &target)?;
            }
            _ => {
                v.directory(&path)?;
                self.dirs.push(DirState { last: None });
                return Ok(true);
            }
        }
        self.input.expect(b")")?;
        Ok(false)
    }
}

/// The entries of a directory [`Node`].
type Entries = BTreeMap<Vec<u8>, Node>;

/// Builds a [`Node`] from the visitor calls, which come depth first: the directories on
/// the path to the current node stay open on a stack until a node outside them arrives.
struct TreeBuilder {
    /// The root, when it is not a directory.
    root: Option<Node>,
    /// Open directories from the root: each with its name (empty for the root).
    open: Vec<(Vec<u8>, Entries)>,
}

impl TreeBuilder {
    /// Closes open directories until the innermost one is the parent of a node `depth`
    /// names below the root (or, for the root, until none is open).
    fn close_to(&mut self, depth: usize) {
        while self.open.len() > depth.max(1) {
            let (name, entries) = self.open.pop().expect("checked by the loop");
            let parent = &mut self.open.last_mut().expect("checked by the loop").1;
            parent.insert(name, Node::Directory(entries));
        }
    }

    fn add(&mut self, path: &[&[u8]], node: Node) {
        self.close_to(path.len());
        match path.last() {
            None => self.root = Some(node),
            Some(name) => {
                let parent = &mut self.open.last_mut().expect("the parent is open").1;
                parent.insert(name.to_vec(), node);
            }
        }
    }

    fn finish(mut self) -> Node {
        self.close_to(1);
        match self.open.pop() {
            Some((_, entries)) => Node::Directory(entries),
            None => self.root.expect("the parser saw a root node"),
        }
    }
}

impl NarVisitor for TreeBuilder {
    fn directory(&mut self, path: &[&[u8]]) -> io::Result<()> {
        self.close_to(path.len());
        let name = path.last().map_or_else(Vec::new, |n| n.to_vec());
        self.open.push((name, BTreeMap::new()));
        Ok(())
    }

    fn symlink(&mut self, path: &[&[u8]], target: &[u8]) -> io::Result<()> {
        self.add(
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
        _size: u64,
        contents: &mut dyn Read,
    ) -> io::Result<()> {
        // Grows with the bytes read, whatever size the NAR declares.
        let mut data = Vec::new();
        contents.read_to_end(&mut data)?;
        self.add(
            path,
            Node::Regular {
                executable,
                contents: data,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{nar, str_};
    use super::*;

    /// The body of a file node, to splice into hand-made NARs.
    const FILE: [&[u8]; 6] = [b"(", b"type", b"regular", b"contents", b"x", b")"];

    fn dir_with(names: &[&[u8]]) -> Vec<u8> {
        let mut tokens: Vec<&[u8]> = vec![b"(", b"type", b"directory"];
        for name in names {
            tokens.extend_from_slice(&[b"entry", b"(", b"name", name, b"node"]);
            tokens.extend_from_slice(&FILE);
            tokens.push(b")");
        }
        tokens.push(b")");
        nar(&tokens)
    }

    /// Parses `bytes` expecting rejection; returns (offset, reason).
    fn reject(bytes: &[u8]) -> (u64, String) {
        match read_tree(bytes) {
            Err(NarReadError::Malformed { offset, reason }) => (offset, reason),
            other => panic!("expected a malformed NAR, got {other:?}"),
        }
    }

    fn assert_rejected(bytes: &[u8], needle: &str) -> u64 {
        let (offset, reason) = reject(bytes);
        assert!(
            reason.contains(needle),
            "reason {reason:?} should mention {needle:?}"
        );
        offset
    }

    #[test]
    fn reads_a_small_tree() {
        let bytes = dir_with(&[b"a", b"b\xff"]);
        let tree = read_tree(&bytes[..]).unwrap();
        let file = Node::Regular {
            executable: false,
            contents: b"x".to_vec(),
        };
        assert_eq!(
            tree,
            Node::Directory(BTreeMap::from([
                (b"a".to_vec(), file.clone()),
                (b"b\xff".to_vec(), file)
            ]))
        );
        assert_eq!(
            parse(
                &bytes[..],
                &mut TreeBuilder {
                    root: None,
                    open: Vec::new()
                }
            )
            .unwrap(),
            bytes.len() as u64
        );
    }

    #[test]
    fn rejects_wrong_magic() {
        let mut bytes = nar(&FILE);
        bytes[8 + 12] = b'2';
        assert_eq!(assert_rejected(&bytes, "bad magic"), 0);
        let bytes = [str_(b"nix-archive"), str_(b"(")].concat();
        assert_rejected(&bytes, "bad magic");
    }

    #[test]
    fn rejects_unknown_tokens() {
        let bytes = nar(&[b"(", b"type", b"fifo", b")"]);
        let offset = assert_rejected(&bytes, "unknown token \"fifo\"");
        assert_eq!(offset, 24 + 16 + 16);
        let bytes = nar(&[
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"yes",
            b"contents",
            b"",
            b")",
        ]);
        assert_rejected(&bytes, "unknown token \"yes\"");
        let bytes = nar(&[b"(", b"type", b"symlink", b"target", b"t", b")", b")"]);
        assert_rejected(&bytes, "trailing bytes");
    }

    #[test]
    fn rejects_absurd_token_length_without_reading_it() {
        let mut bytes = nar(&[b"(", b"type"]);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_rejected(
            &bytes,
            "unknown token: a string of 18446744073709551615 bytes",
        );
    }

    #[test]
    fn rejects_unsorted_entries() {
        let offset = assert_rejected(
            &dir_with(&[b"b", b"a"]),
            "entries not sorted: \"a\" after \"b\"",
        );
        assert!(offset > 0);
        // Bytewise, not locale order: "a" sorts after "Z".
        assert_rejected(&dir_with(&[b"a", b"Z"]), "not sorted");
    }

    #[test]
    fn rejects_duplicate_entries() {
        assert_rejected(&dir_with(&[b"a", b"a"]), "duplicate entry \"a\"");
    }

    #[test]
    fn rejects_empty_name() {
        assert_rejected(&dir_with(&[b""]), "empty name");
    }

    #[test]
    fn rejects_dot() {
        assert_rejected(&dir_with(&[b"."]), "`.` and `..` are not allowed");
    }

    #[test]
    fn rejects_dot_dot() {
        assert_rejected(&dir_with(&[b".."]), "`.` and `..` are not allowed");
    }

    #[test]
    fn rejects_slash_in_name() {
        assert_rejected(&dir_with(&[b"a/b"]), "contains `/`");
    }

    #[test]
    fn rejects_nul_in_name() {
        assert_rejected(&dir_with(&[b"a\0b"]), "contains a NUL byte");
    }

    #[test]
    fn rejects_non_zero_padding() {
        // Padding of the file contents "x": the byte after it.
        let mut bytes = nar(&FILE);
        let at = bytes.len() - 16 - 7;
        bytes[at] = 1;
        assert_eq!(
            assert_rejected(&bytes, "non-zero padding byte 0x01 after file contents"),
            at as u64
        );
        // Padding of a token.
        let mut bytes = nar(&FILE);
        bytes[24 + 8 + 3] = 0xff;
        assert_eq!(
            assert_rejected(&bytes, "non-zero padding byte 0xff after a token"),
            35
        );
        // Padding of a name.
        let mut bytes = dir_with(&[b"abc"]);
        let at = bytes
            .windows(8)
            .position(|w| w == b"abc\0\0\0\0\0")
            .unwrap()
            + 7;
        bytes[at] = b'!';
        assert_eq!(
            assert_rejected(&bytes, "non-zero padding byte 0x21 after an entry name"),
            at as u64
        );
    }

    #[test]
    fn rejects_truncated_input_at_every_length() {
        let bytes = nar(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"f",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"hello world",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"l",
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"f",
            b")",
            b")",
            b")",
        ]);
        read_tree(&bytes[..]).unwrap();
        for len in 0..bytes.len() {
            let (offset, reason) = reject(&bytes[..len]);
            assert!(reason.starts_with("truncated"), "at {len}: {reason}");
            assert!(offset <= len as u64, "at {len}: offset {offset}");
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = nar(&FILE);
        let len = bytes.len() as u64;
        bytes.push(0);
        assert_eq!(
            assert_rejected(&bytes, "trailing bytes after the end of the NAR"),
            len
        );
    }

    #[test]
    fn rejects_long_name_without_allocating() {
        let mut bytes = nar(&[b"(", b"type", b"directory", b"entry", b"(", b"name"]);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_rejected(
            &bytes,
            "an entry name too long: 18446744073709551615 bytes, at most 4096",
        );
        let long = vec![b'n'; MAX_NAME_LEN + 1];
        assert_rejected(&dir_with(&[&long]), "too long: 4097 bytes");
        let longest = vec![b'n'; MAX_NAME_LEN];
        read_tree(&dir_with(&[&longest])[..]).unwrap();
    }

    #[test]
    fn rejects_long_symlink_target_without_allocating() {
        let mut bytes = nar(&[b"(", b"type", b"symlink", b"target"]);
        bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert_rejected(&bytes, "a symlink target too long");
        let long = vec![b't'; MAX_TARGET_LEN + 1];
        assert_rejected(
            &nar(&[b"(", b"type", b"symlink", b"target", &long, b")"]),
            "too long",
        );
    }

    #[test]
    fn huge_declared_file_size_is_truncation_not_allocation() {
        let mut bytes = nar(&[b"(", b"type", b"regular", b"contents"]);
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        bytes.extend_from_slice(b"only this");
        assert_rejected(&bytes, "truncated: input ends in file contents");
    }

    #[test]
    fn rejects_deep_nesting() {
        let nested = |depth: usize| {
            let mut tokens: Vec<&[u8]> = Vec::new();
            for _ in 0..depth {
                tokens.extend_from_slice(&[
                    b"(",
                    b"type",
                    b"directory",
                    b"entry",
                    b"(",
                    b"name",
                    b"d",
                    b"node",
                ]);
            }
            tokens.extend_from_slice(&FILE);
            for _ in 0..depth {
                tokens.extend_from_slice(&[b")", b")"]);
            }
            nar(&tokens)
        };
        let mut builder = CountingVisitor::default();
        parse(&nested(MAX_DEPTH)[..], &mut builder).unwrap();
        assert_eq!(builder.nodes, MAX_DEPTH + 1);
        assert_rejected(&nested(MAX_DEPTH + 1), "nested too deep");
    }

    #[derive(Default)]
    struct CountingVisitor {
        nodes: usize,
    }

    impl NarVisitor for CountingVisitor {
        fn directory(&mut self, _: &[&[u8]]) -> io::Result<()> {
            self.nodes += 1;
            Ok(())
        }
        fn symlink(&mut self, _: &[&[u8]], _: &[u8]) -> io::Result<()> {
            self.nodes += 1;
            Ok(())
        }
        /// Reads nothing: the parser must skip the contents.
        fn regular(&mut self, _: &[&[u8]], _: bool, _: u64, _: &mut dyn Read) -> io::Result<()> {
            self.nodes += 1;
            Ok(())
        }
    }

    #[test]
    fn unread_contents_are_skipped() {
        let big = vec![7u8; 100_003];
        let bytes = nar(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"a",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            &big,
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"b",
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"a",
            b")",
            b")",
            b")",
        ]);
        let mut v = CountingVisitor::default();
        assert_eq!(parse(&bytes[..], &mut v).unwrap(), bytes.len() as u64);
        assert_eq!(v.nodes, 3);
    }

    #[test]
    fn visitor_sees_paths_and_errors_propagate() {
        struct Failing(Vec<Vec<u8>>);
        impl NarVisitor for Failing {
            fn directory(&mut self, path: &[&[u8]]) -> io::Result<()> {
                self.0.push(path.join(&b'/'));
                Ok(())
            }
            fn symlink(&mut self, _: &[&[u8]], _: &[u8]) -> io::Result<()> {
                Err(io::Error::other("no symlinks here"))
            }
            fn regular(
                &mut self,
                path: &[&[u8]],
                _: bool,
                size: u64,
                c: &mut dyn Read,
            ) -> io::Result<()> {
                self.0.push(path.join(&b'/'));
                let mut half = vec![0; size as usize / 2];
                c.read_exact(&mut half)
            }
        }
        let bytes = nar(&[
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"d",
            b"node",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"f",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"0123456789",
            b")",
            b")",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"l",
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"x",
            b")",
            b")",
            b")",
        ]);
        let mut v = Failing(Vec::new());
        match parse(&bytes[..], &mut v) {
            Err(NarReadError::Io(e)) => assert_eq!(e.to_string(), "no symlinks here"),
            other => panic!("{other:?}"),
        }
        assert_eq!(v.0, [b"".to_vec(), b"d".to_vec(), b"d/f".to_vec()]);
    }
}
