//! Store-path trees: the files, directories and symlinks of one generated store path.

use super::*;

/// Content below this goes into a small tree (1–3 files); above, a package-like tree.
pub(super) const SMALL_TREE_MAX: u64 = 64 << 10;

pub(super) fn mkdir(path: &Path) -> Result<(), BenchError> {
    fs::create_dir_all(path).map_err(io_error(path))
}

pub(super) fn symlink(target: &str, link: &Path) -> Result<(), BenchError> {
    std::os::unix::fs::symlink(target, link).map_err(io_error(link))
}

/// A small store path: a directory with 1–3 small files of `size` bytes in all, in
/// subdirectories (`bin/`, `lib/`, `share/doc/…`, `nix-support/`, `etc/`).
pub(super) fn small_tree(
    root: &Path,
    size: u64,
    rng: &mut Rng,
    ctx: &TreeCtx<'_>,
) -> Result<(), BenchError> {
    mkdir(root)?;
    let pkg = ctx.pkg;
    let short = pkg.split('-').next().unwrap_or(pkg);
    // (directory, file name, executable, content)
    let mut kinds: Vec<(String, String, bool, Content)> = vec![
        (
            format!("share/doc/{pkg}"),
            "README".into(),
            false,
            Content::Text,
        ),
        ("bin".into(), short.into(), true, Content::Script),
        (
            "nix-support".into(),
            "propagated-build-inputs".into(),
            false,
            Content::Text,
        ),
        ("lib".into(), format!("lib{short}.so.1"), true, Content::Elf),
        (
            format!("etc/{short}"),
            format!("{short}.conf"),
            false,
            Content::Text,
        ),
        (
            format!("share/{short}"),
            "data.gz".into(),
            false,
            Content::Compressed,
        ),
    ];
    let n = 1 + rng.below(3) as usize;
    // Partial Fisher–Yates: the first n are a random choice.
    for i in 0..n {
        let j = i + rng.below((kinds.len() - i) as u64) as usize;
        kinds.swap(i, j);
    }
    let mut left = size;
    for (i, (dir, name, exec, kind)) in kinds.into_iter().take(n).enumerate() {
        let part = if i + 1 == n {
            left
        } else {
            rng.range(left / 4, left / 2)
        };
        left -= part;
        let dir = root.join(dir);
        mkdir(&dir)?;
        if name == "propagated-build-inputs" {
            // Real nix-support files list references: write them first, then pad with text.
            let listed = ctx.refs.join(" ");
            let listed = &listed.as_bytes()[..listed.len().min(part as usize)];
            let path = dir.join(&name);
            let mut f = File::create(&path).map_err(io_error(&path))?;
            f.write_all(listed).map_err(io_error(&path))?;
            let mut buf = Vec::new();
            text(&mut buf, part as usize - listed.len(), rng, ctx);
            f.write_all(&buf[..part as usize - listed.len()])
                .map_err(io_error(&path))?;
        } else {
            write_file(&dir.join(&name), part, exec, kind, rng, ctx)?;
        }
        if kind == Content::Elf {
            symlink(&name, &dir.join(format!("lib{short}.so")))?;
        }
    }
    Ok(())
}

/// A package-like store path of about `size` bytes of file contents: executables and
/// libraries (ELF-like, with `.so` symlinks), headers, documentation, man pages, data
/// archives and firmware images, in nested directories; plus an empty file, an empty
/// directory and a symlink into a referenced store path.
pub(super) fn package_tree(
    root: &Path,
    size: u64,
    rng: &mut Rng,
    ctx: &TreeCtx<'_>,
) -> Result<(), BenchError> {
    mkdir(root)?;
    let pkg = ctx.pkg;
    let short = pkg.split('-').next().unwrap_or(pkg).to_owned();
    // (content, percent of bytes, smallest file, largest file)
    let plan: [(Content, u64, u64, u64); 4] = [
        (Content::Elf, 45, 4 << 10, 48 << 20),
        (Content::Text, 25, 8, 2 << 20),
        (Content::Compressed, 20, 512, 32 << 20),
        (Content::Sparse, 10, 64 << 10, 16 << 20),
    ];
    let text_dirs = [
        format!("share/doc/{pkg}"),
        format!("share/doc/{pkg}/html"),
        format!("include/{short}"),
        format!("include/{short}/detail"),
        "share/man/man1".to_owned(),
        "lib/pkgconfig".to_owned(),
        format!("share/{short}"),
        format!("share/{short}/scripts"),
        "share/locale/de/LC_MESSAGES".to_owned(),
    ];
    let text_ext = [
        ".md", ".html", ".h", ".hpp", ".1", ".pc", ".json", ".py", ".mo",
    ];
    let mut made = std::collections::HashSet::new();
    let mut ensure = |dir: &str| -> Result<PathBuf, BenchError> {
        let p = root.join(dir);
        if made.insert(dir.to_owned()) {
            mkdir(&p)?;
        }
        Ok(p)
    };
    let mut n = 0u64;
    let mut used = 0u64;
    for (i, &(kind, share, min, max)) in plan.iter().enumerate() {
        let mut left = if i + 1 == plan.len() {
            size - used
        } else {
            size * share / 100
        };
        used += left;
        while left > 0 {
            let mut file = rng.log_uniform(min, max).min(left);
            if left - file < min {
                file = left;
            }
            left -= file;
            n += 1;
            let word = ctx.vocab.word_str(rng);
            match kind {
                Content::Elf => {
                    if n.is_multiple_of(3) {
                        let dir = ensure("bin")?;
                        write_file(&dir.join(format!("{word}{n}")), file, true, kind, rng, ctx)?;
                        if rng.percent(20) {
                            symlink(&format!("{word}{n}"), &dir.join(format!("{word}{n}-alias")))?;
                        }
                    } else {
                        let dir = ensure(if n % 3 == 1 { "lib" } else { "libexec" })?;
                        let real = format!("lib{word}{n}.so.{}.{}", rng.below(10), rng.below(40));
                        write_file(&dir.join(&real), file, true, kind, rng, ctx)?;
                        symlink(&real, &dir.join(format!("lib{word}{n}.so")))?;
                    }
                }
                Content::Text | Content::Script => {
                    let k = rng.below(text_dirs.len() as u64) as usize;
                    let dir = ensure(&text_dirs[k])?;
                    write_file(
                        &dir.join(format!("{word}{n}{}", text_ext[k])),
                        file,
                        false,
                        Content::Text,
                        rng,
                        ctx,
                    )?;
                }
                Content::Compressed => {
                    let (dir, ext) = match rng.below(3) {
                        0 => (format!("share/{short}/data"), ".gz"),
                        1 => ("share/icons/hicolor/48x48/apps".to_owned(), ".png"),
                        _ => ("share/java".to_owned(), ".jar"),
                    };
                    let dir = ensure(&dir)?;
                    write_file(
                        &dir.join(format!("{word}{n}{ext}")),
                        file,
                        false,
                        kind,
                        rng,
                        ctx,
                    )?;
                }
                Content::Sparse => {
                    let dir = ensure(&format!("share/{short}/firmware"))?;
                    write_file(
                        &dir.join(format!("{word}{n}.img")),
                        file,
                        false,
                        kind,
                        rng,
                        ctx,
                    )?;
                }
            }
        }
    }
    let share = ensure(&format!("share/{short}"))?;
    File::create(share.join(".keep")).map_err(io_error(&share))?;
    mkdir(&share.join("empty"))?;
    if let Some(r) = ctx.refs.first() {
        symlink(&format!("{r}/lib"), &share.join("dependency-lib"))?;
    }
    Ok(())
}
