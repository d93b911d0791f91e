//! File contents: what a generated file holds, built from the seed with integer arithmetic only.

use super::*;

/// What a generated file contains. Shares of a `package_tree` are chosen so zstd -3
/// compresses the whole at roughly 3:1, as it does real store paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Content {
    /// Prose, code and configuration: words, numbers, store paths, indentation.
    Text,
    /// A shell script: a shebang into another store path, then text.
    Script,
    /// An ELF-like binary: header, machine-code-like text, strings, relocation records,
    /// zero padding.
    Elf,
    /// Already-compressed data (archives, images): incompressible.
    Compressed,
    /// A disk or firmware image: mostly zero blocks, some data.
    Sparse,
}

/// Everything content generation needs besides randomness.
#[derive(Debug)]
pub(super) struct TreeCtx<'a> {
    pub(super) vocab: &'a Vocab,
    /// The package name (the store path's name).
    pub(super) pkg: &'a str,
    /// Store paths the content mentions, as `/nix/store/<base name>` (never the fake store
    /// dir, so contents do not depend on where the workload is generated).
    pub(super) refs: &'a [String],
}

/// Scratch size in which content is generated before it is written.
pub(super) const PIECE: usize = 64 << 10;

/// Writes exactly `size` bytes of `kind` to a new file at `path`.
pub(super) fn write_file(
    path: &Path,
    size: u64,
    executable: bool,
    kind: Content,
    rng: &mut Rng,
    ctx: &TreeCtx<'_>,
) -> Result<(), BenchError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if executable { 0o755 } else { 0o644 })
        .open(path)
        .map_err(io_error(path))?;
    let mut out = BufWriter::with_capacity(PIECE, file);
    let mut generator = ContentGen::new(kind, size);
    let mut left = size;
    let mut buf = Vec::with_capacity(PIECE + 1024);
    while left > 0 {
        let want = left.min(PIECE as u64) as usize;
        buf.clear();
        generator.fill(&mut buf, want, rng, ctx);
        buf.truncate(want);
        out.write_all(&buf).map_err(io_error(path))?;
        left -= want as u64;
    }
    out.flush().map_err(io_error(path))
}

/// A content generator with the state one file needs across pieces.
#[derive(Debug)]
pub(super) struct ContentGen {
    pub(super) kind: Content,
    /// Bytes produced so far.
    pub(super) pos: u64,
    /// ELF only: section boundaries (end offsets) and their kinds.
    pub(super) sections: Vec<(u64, Section)>,
    /// ELF only: last relocation offset, so records increase like real ones.
    pub(super) reloc: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Section {
    Header,
    Code,
    Strings,
    Relocs,
    Zeros,
}

impl ContentGen {
    pub(super) fn new(kind: Content, size: u64) -> Self {
        let mut sections = Vec::new();
        if kind == Content::Elf {
            // Shares of the file per section, in file order (percent).
            let plan: &[(Section, u64)] = &[
                (Section::Code, 38),
                (Section::Zeros, 7),
                (Section::Strings, 18),
                (Section::Relocs, 22),
                (Section::Zeros, 6),
                (Section::Strings, 6),
                (Section::Relocs, 3),
            ];
            let header = size.min(64 + 56 * 11);
            sections.push((header, Section::Header));
            let body = size - header;
            let mut end = header;
            for &(s, share) in plan {
                end += body * share / 100;
                sections.push((end, s));
            }
            if let Some(last) = sections.last_mut() {
                last.0 = size;
            }
        }
        ContentGen {
            kind,
            pos: 0,
            sections,
            reloc: 0x4000,
        }
    }

    /// Appends at least `want` bytes to `buf` (the caller truncates).
    pub(super) fn fill(
        &mut self,
        buf: &mut Vec<u8>,
        want: usize,
        rng: &mut Rng,
        ctx: &TreeCtx<'_>,
    ) {
        match self.kind {
            Content::Text => text(buf, want, rng, ctx),
            Content::Script => {
                if self.pos == 0 {
                    let shebang = match ctx.refs.first() {
                        Some(r) => format!("#!{r}/bin/sh\nset -e\n"),
                        None => "#!/bin/sh\nset -e\n".to_owned(),
                    };
                    buf.extend_from_slice(shebang.as_bytes());
                }
                text(buf, want, rng, ctx);
            }
            Content::Compressed => {
                let start = buf.len();
                buf.resize(start + want, 0);
                rng.fill(&mut buf[start..]);
                if self.pos == 0 && want >= 4 {
                    buf[start..start + 4].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x00]);
                }
            }
            Content::Sparse => {
                while buf.len() < want {
                    let block = 4096.min(want - buf.len());
                    let start = buf.len();
                    match rng.below(100) {
                        0..=5 => {
                            buf.resize(start + block, 0);
                            rng.fill(&mut buf[start..]);
                        }
                        6..=9 => text(buf, start + block, rng, ctx),
                        _ => buf.resize(start + block, 0),
                    }
                }
            }
            Content::Elf => self.elf(buf, want, rng, ctx),
        }
        self.pos += want as u64;
    }

    pub(super) fn elf(&mut self, buf: &mut Vec<u8>, want: usize, rng: &mut Rng, ctx: &TreeCtx<'_>) {
        let start = self.pos;
        while buf.len() < want {
            let at = start + buf.len() as u64;
            let Some(&(end, section)) = self.sections.iter().find(|(end, _)| *end > at) else {
                buf.resize(want, 0);
                break;
            };
            let target = ((end - start) as usize).min(want);
            match section {
                Section::Header => {
                    let header = elf_header(end);
                    let to = (start as usize + target).min(header.len());
                    buf.extend_from_slice(&header[(at as usize).min(to)..to]);
                    if buf.len() < target {
                        buf.resize(target, 0);
                    }
                }
                Section::Zeros => {
                    if buf.len() < target {
                        buf.resize(target, 0);
                    }
                }
                Section::Code => {
                    let section_start = buf.len();
                    while buf.len() < target {
                        // Compilers repeat idioms: prologues, epilogues, spills.
                        let written = buf.len() - section_start;
                        if written > 256 && rng.percent(15) {
                            repeat_recent(buf, written, rng);
                            continue;
                        }
                        let op = &ctx.vocab.ops[rng.skewed(ctx.vocab.ops.len() as u64) as usize];
                        buf.extend_from_slice(op);
                        match rng.below(16) {
                            0..=6 => {}
                            7..=9 => buf.push(rng.skewed(256) as u8),
                            10..=13 => {
                                // A near call or jump: a small signed displacement.
                                let d = rng.skewed(1 << 14) as i32;
                                let d = if rng.percent(50) { d } else { -d };
                                buf.extend_from_slice(&d.to_le_bytes());
                            }
                            14 => buf.extend_from_slice(&(rng.skewed(4096) as u32).to_le_bytes()),
                            _ => {
                                let pad = 1 + rng.below(8) as usize;
                                buf.extend(std::iter::repeat_n(0xcc, pad));
                            }
                        }
                    }
                }
                Section::Strings => {
                    while buf.len() < target {
                        match rng.below(8) {
                            0 => {
                                if let Some(r) = ctx
                                    .refs
                                    .get(rng.below(ctx.refs.len().max(1) as u64) as usize)
                                {
                                    buf.extend_from_slice(r.as_bytes());
                                    buf.extend_from_slice(b"/lib");
                                }
                            }
                            1..=3 => {
                                buf.extend_from_slice(b"_ZN");
                                for _ in 0..1 + rng.below(3) {
                                    let w = ctx.vocab.word(rng);
                                    buf.extend_from_slice(w.len().to_string().as_bytes());
                                    buf.extend_from_slice(w);
                                }
                                buf.push(b'E');
                            }
                            _ => {
                                for k in 0..1 + rng.below(6) {
                                    if k > 0 {
                                        buf.push(b' ');
                                    }
                                    buf.extend_from_slice(ctx.vocab.word(rng));
                                }
                            }
                        }
                        buf.push(0);
                    }
                }
                Section::Relocs => {
                    while buf.len() < target {
                        self.reloc += 8 * (1 + rng.skewed(4));
                        buf.extend_from_slice(&self.reloc.to_le_bytes());
                        let info = (rng.skewed(1024) << 32) | [6, 7, 8, 1][rng.below(4) as usize];
                        buf.extend_from_slice(&info.to_le_bytes());
                        let addend = if rng.percent(60) {
                            0
                        } else {
                            rng.below(1 << 20)
                        };
                        buf.extend_from_slice(&addend.to_le_bytes());
                    }
                }
            }
        }
    }
}

/// An ELF64 header and program headers for a shared object of `len` bytes of headers.
pub(super) fn elf_header(len: u64) -> Vec<u8> {
    let mut h = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
    h.resize(16, 0);
    h.extend_from_slice(&3u16.to_le_bytes()); // ET_DYN
    h.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&0x1040u64.to_le_bytes()); // entry
    h.extend_from_slice(&64u64.to_le_bytes()); // phoff
    h.extend_from_slice(&0u64.to_le_bytes()); // shoff
    h.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 11, 64, 30, 29] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    for i in 0..11u64 {
        h.extend_from_slice(&[1, 0, 0, 0, 4 + (i % 3) as u8, 0, 0, 0]);
        for v in [
            i * 0x1000,
            i * 0x1000,
            i * 0x1000,
            0x200 + i * 8,
            0x200 + i * 8,
            0x1000,
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
    }
    h.truncate(len as usize);
    h
}

/// Appends a copy of 16–79 bytes from the last 4 KiB of the `written` bytes at the end of
/// `buf` (`written` > 256).
pub(super) fn repeat_recent(buf: &mut Vec<u8>, written: usize, rng: &mut Rng) {
    let back = 64 + rng.below(written.min(4096) as u64 - 64) as usize;
    let from = buf.len() - back;
    let len = (16 + rng.below(64) as usize).min(back);
    buf.extend_from_within(from..from + len);
}

/// Appends text (lines of words, numbers, punctuation, store paths) until `buf` holds
/// `want` bytes or more.
pub(super) fn text(buf: &mut Vec<u8>, want: usize, rng: &mut Rng, ctx: &TreeCtx<'_>) {
    const PUNCT: &[&[u8]] = &[
        b" ", b" ", b" ", b" ", b", ", b". ", b" = ", b"(", b") ", b"; ", b": ", b" - ", b"_", b"/",
    ];
    let piece_start = buf.len();
    while buf.len() < want {
        // Text repeats itself (identifiers, boilerplate, markup): now and then a line
        // reuses a stretch of what came shortly before.
        let written = buf.len() - piece_start;
        if written > 256 && rng.percent(30) {
            repeat_recent(buf, written, rng);
            buf.push(b'\n');
            continue;
        }
        let indent = [0usize, 0, 0, 2, 4, 4, 8][rng.below(7) as usize];
        buf.extend(std::iter::repeat_n(b' ', indent));
        let words = 2 + rng.below(12);
        for k in 0..words {
            if k > 0 {
                buf.extend_from_slice(PUNCT[rng.skewed(PUNCT.len() as u64) as usize]);
            }
            match rng.below(64) {
                0 => buf.extend_from_slice(rng.below(100_000).to_string().as_bytes()),
                1 if !ctx.refs.is_empty() => {
                    buf.extend_from_slice(
                        ctx.refs[rng.below(ctx.refs.len() as u64) as usize].as_bytes(),
                    );
                }
                2 => buf.extend_from_slice(ctx.pkg.as_bytes()),
                _ => buf.extend_from_slice(ctx.vocab.word(rng)),
            }
        }
        buf.push(b'\n');
    }
}
