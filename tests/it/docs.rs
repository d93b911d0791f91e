//! The manual (`docs/`, an mdBook) and the README, read as Markdown: every chapter file is
//! in `docs/src/SUMMARY.md` and every file it names exists; every relative link in a
//! chapter or the README names a file that exists (a chapter's, inside `docs/src/`, so the
//! built book has it too) and, with `#anchor`, a heading of that file. Heading ids are
//! made as mdBook makes them (GitHub makes the same for these headings). With
//! `NARFLOW_TEST_BOOK=DIR` (`scripts/test` sets it after `mdbook build docs`), every
//! anchor is also looked up among the `id`s of the built HTML page, which checks the ids
//! computed here against mdBook's own.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown outside fenced code blocks, one string per paragraph (a code span or a
/// link never crosses a blank line).
fn paragraphs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        if line.trim().is_empty() {
            out.push(std::mem::take(&mut current));
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    out.push(current);
    out.retain(|p| !p.is_empty());
    out
}

/// `text` with its code spans (`` `...` ``) emptied, so nothing inside one is taken for
/// a link.
fn without_code_spans(text: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for c in text.chars() {
        if c == '`' {
            in_code = !in_code;
            out.push('`');
        } else if !in_code {
            out.push(c);
        }
    }
    out
}

/// The targets of the inline links (`[text](target)`) of a Markdown text.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for p in paragraphs(text) {
        let p = without_code_spans(&p);
        let mut rest = p.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            targets.push(after[..end].trim().to_owned());
            rest = &after[end..];
        }
    }
    targets
}

/// A heading's id as mdBook makes it from the heading's text: code spans and links by
/// their text, lower case, whitespace to `-`, punctuation but `-` and `_` dropped; a
/// repeated id gets `-1`, `-2`, ...
fn heading_ids(text: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let Some(title) = line
            .strip_prefix('#')
            .map(|l| l.trim_start_matches('#'))
            .filter(|t| !fenced && t.starts_with(' '))
        else {
            continue;
        };
        // A link's text only: drop each `(target)` that follows a `]`.
        let mut plain = String::new();
        let mut rest = title;
        while let Some(at) = rest.find("](") {
            plain.push_str(&rest[..at]);
            rest = rest[at + 2..].split_once(')').map_or("", |(_, r)| r);
        }
        plain.push_str(rest);
        let id: String = plain
            .trim()
            .chars()
            .filter_map(|c| {
                if c.is_alphanumeric() || c == '_' || c == '-' {
                    Some(c.to_ascii_lowercase())
                } else if c.is_whitespace() {
                    Some('-')
                } else {
                    None
                }
            })
            .collect();
        let n = seen.entry(id.clone()).or_insert(0);
        ids.insert(if *n == 0 { id } else { format!("{id}-{n}") });
        *n += 1;
    }
    ids
}

/// `base/relative` with `.` and `..` resolved, without touching the file system.
fn join(base: &Path, relative: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(relative).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// The chapters: every Markdown file of `docs/src`.
fn chapters() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs/src"))
        .expect("docs/src is the manual's source")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    files
}

/// What is wrong with the links of `file`: targets that do not exist, anchors that name
/// no heading, and links from a chapter out of `docs/src`.
fn broken_links(file: &Path, book_html: Option<&Path>) -> Vec<String> {
    let root = root();
    let src = root.join("docs/src");
    let text = std::fs::read_to_string(file).unwrap();
    let name = file.strip_prefix(&root).unwrap().display().to_string();
    let mut problems = Vec::new();
    for target in link_targets(&text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target.as_str(), None),
        };
        let linked = if path.is_empty() {
            file.to_path_buf()
        } else {
            join(file.parent().unwrap(), path)
        };
        if !linked.exists() {
            problems.push(format!("{name}: ({target}): no file {}", linked.display()));
            continue;
        }
        if file.starts_with(&src) && !linked.starts_with(&src) {
            problems.push(format!(
                "{name}: ({target}): a chapter may link only within docs/src (the built book has nothing else)"
            ));
            continue;
        }
        let Some(anchor) = anchor else { continue };
        let linked_text = std::fs::read_to_string(&linked).unwrap_or_default();
        if !heading_ids(&linked_text).contains(anchor) {
            problems.push(format!(
                "{name}: ({target}): no heading in {} has the id `{anchor}`",
                linked.display()
            ));
            continue;
        }
        if let (Some(book), Ok(rel)) = (book_html, linked.strip_prefix(&src)) {
            let page = book.join(rel).with_extension("html");
            let html = std::fs::read_to_string(&page)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", page.display()));
            if !html.contains(&format!("id=\"{anchor}\"")) {
                problems.push(format!(
                    "{name}: ({target}): the built page {} has no id `{anchor}`",
                    page.display()
                ));
            }
        }
    }
    problems
}

#[test]
fn every_chapter_is_in_the_summary_and_every_entry_exists() {
    let src = root().join("docs/src");
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).unwrap();
    let listed: BTreeSet<PathBuf> = link_targets(&summary)
        .iter()
        .map(|t| join(&src, t))
        .collect();
    for entry in &listed {
        assert!(
            entry.exists(),
            "SUMMARY.md names {}, which does not exist",
            entry.display()
        );
    }
    for chapter in chapters() {
        if chapter.file_name().is_some_and(|n| n == "SUMMARY.md") {
            continue;
        }
        assert!(
            listed.contains(&chapter),
            "{} is not in docs/src/SUMMARY.md",
            chapter.display()
        );
    }
}

#[test]
fn every_link_in_the_manual_and_the_readme_resolves() {
    let book = std::env::var_os("NARFLOW_TEST_BOOK").map(PathBuf::from);
    if let Some(book) = &book {
        assert!(
            book.join("index.html").exists(),
            "NARFLOW_TEST_BOOK={}: no built book there (run `mdbook build docs`)",
            book.display()
        );
    }
    let mut files = chapters();
    files.push(root().join("README.md"));
    let mut problems = Vec::new();
    let mut links = 0;
    for file in &files {
        links += link_targets(&std::fs::read_to_string(file).unwrap()).len();
        problems.extend(broken_links(file, book.as_deref()));
    }
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
    // The README links into the manual, and the chapters into each other.
    assert!(
        links > 50,
        "only {links} links found: is the link reader broken?"
    );
}

#[test]
fn the_link_reader_finds_links_and_heading_ids_as_mdbook_makes_them() {
    let text = "# `narflow gc`\n\nSee [the `gc` chapter](a.md#x) and `[not](a link)`,\n\
                [over\nlines](b.md).\n\n```\n[in code](c.md)\n# not a heading\n```\n\n\
                ## Verify: NAR contents against the machine's ceiling\n\n## `narflow gc`\n";
    assert_eq!(link_targets(text), ["a.md#x", "b.md"]);
    let ids = heading_ids(text);
    let expected = [
        "narflow-gc",
        "narflow-gc-1",
        "verify-nar-contents-against-the-machines-ceiling",
    ];
    assert_eq!(ids, expected.iter().map(|s| s.to_string()).collect());
}
