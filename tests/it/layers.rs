//! The crate's layers, read from `src/`: a top-level module uses (or doc-links) only
//! modules of lower layers, and the files of one module never form a circle. Every path
//! is read with `syn`: `use` trees, paths in code and types, `crate::`/`super::` paths
//! inside macros, and the `crate::`/`super::`/`self::` paths in doc comments. Test code
//! (`#[cfg(test)]` items and files) is left out: a test may build its fixtures with any
//! module of the crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// The library's top-level modules, lowest layer first. A module may use only modules of
/// lower rows; modules of one row never use each other. A new module goes in the lowest
/// row whose modules it needs none of.
const LAYERS: &[&[&str]] = &[
    &["format", "handoff", "memory"],
    &["nar_fs"],
    &["store"],
    &["cache"],
    &["pipeline"],
    &["logs"],
    &["settings"],
    &["backfill", "daemon", "bench", "maintain"],
];

/// A module path inside one crate, `crate` left out: `["pipeline", "walk"]`.
type ModPath = Vec<String>;

/// One source file of a crate.
#[derive(Debug)]
struct SourceFile {
    path: PathBuf,
    module: ModPath,
    /// Declared `#[cfg(test)]` (or inside such a module).
    test_only: bool,
}

/// A path one file names: where it points, and what names it (for messages).
#[derive(Debug)]
struct Reference {
    target: ModPath,
    text: String,
    line: usize,
    /// Named by test code: exempt from both rules (a test may build its fixtures with any
    /// module of the crate).
    test: bool,
}

/// Whether `attrs` hold `#[cfg(test)]`.
fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && matches!(&a.meta, syn::Meta::List(l) if l.tokens.to_string() == "test")
    })
}

/// The attributes of an item that may carry `#[cfg(test)]`.
fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// Every file of the crate rooted at `root` (`lib.rs`, `main.rs`), found by following
/// `mod name;` declarations; `read` gives a file's text.
fn crate_files(root: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Vec<(SourceFile, String)> {
    let mut out = Vec::new();
    let mut todo = vec![(root.to_path_buf(), ModPath::new(), false)];
    while let Some((path, module, test_only)) = todo.pop() {
        let text = read(&path).unwrap_or_else(|| panic!("{}: cannot read", path.display()));
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let stem = path.file_stem().unwrap().to_str().unwrap();
        let dir = if ["mod", "lib", "main"].contains(&stem) || module.is_empty() {
            path.parent().unwrap().to_path_buf()
        } else {
            path.parent().unwrap().join(stem)
        };
        for item in &file.items {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
            {
                let name = m.ident.to_string();
                let flat = dir.join(format!("{name}.rs"));
                let nested = dir.join(&name).join("mod.rs");
                let child = if read(&flat).is_some() { flat } else { nested };
                let mut child_module = module.clone();
                child_module.push(name);
                todo.push((child, child_module, test_only || is_cfg_test(&m.attrs)));
            }
        }
        let file = SourceFile {
            path,
            module,
            test_only,
        };
        out.push((file, text));
    }
    out.sort_by(|a, b| a.0.module.cmp(&b.0.module));
    out
}

/// Collects the paths a file names, resolved against its module.
struct Collector<'a> {
    /// Modules of the crate that are files or inline `mod` blocks.
    modules: &'a BTreeSet<ModPath>,
    /// The module being read (a file's, then any inline module's inside it).
    current: ModPath,
    /// Inside test code.
    in_test: bool,
    refs: Vec<Reference>,
}

impl Collector<'_> {
    /// The module `segments` names from the current one, if it names one of the crate's.
    fn resolve(&self, segments: &[String]) -> Option<ModPath> {
        let mut base = match segments.first().map(String::as_str) {
            Some("crate") => ModPath::new(),
            Some("self") => self.current.clone(),
            Some("super") => self.current.clone(),
            Some(first) => {
                let mut child = self.current.clone();
                child.push(first.to_owned());
                if !self.modules.contains(&child) {
                    return None;
                }
                self.current.clone()
            }
            None => return None,
        };
        let mut rest = segments;
        if matches!(rest[0].as_str(), "crate" | "self") {
            rest = &rest[1..];
        }
        while rest.first().is_some_and(|s| s == "super") {
            base.pop()?;
            rest = &rest[1..];
        }
        for seg in rest {
            let mut next = base.clone();
            next.push(seg.clone());
            if !self.modules.contains(&next) {
                break;
            }
            base = next;
        }
        Some(base)
    }

    fn add(&mut self, segments: Vec<String>, line: usize) {
        if let Some(target) = self.resolve(&segments) {
            self.refs.push(Reference {
                target,
                text: segments.join("::"),
                line,
                test: self.in_test,
            });
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree, line: usize) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree, line);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.add(prefix.clone(), line);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.add(prefix.clone(), line);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.add(prefix.clone(), line),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t, line);
                }
            }
        }
    }

    /// `crate::a::b`, `super::a`, `self::a` paths in free text (doc comments, macro input).
    fn text_paths(&mut self, text: &str, line: usize) {
        let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        for start in ["crate::", "super::", "self::"] {
            for (at, _) in text.match_indices(start) {
                if text[..at].ends_with(|c: char| is_word(c) || c == ':') {
                    continue;
                }
                let mut segments = Vec::new();
                let mut tail = &text[at..];
                loop {
                    let end = tail.find(|c: char| !is_word(c)).unwrap_or(tail.len());
                    if end == 0 {
                        break;
                    }
                    segments.push(tail[..end].to_owned());
                    match tail[end..].strip_prefix("::") {
                        Some(rest) => tail = rest,
                        None => break,
                    }
                }
                self.add(segments, line);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let outer = self.in_test;
        self.in_test |= is_cfg_test(item_attrs(item));
        syn::visit::visit_item(self, item);
        self.in_test = outer;
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        let outer = self.in_test;
        self.in_test |= is_cfg_test(&f.attrs);
        syn::visit::visit_impl_item_fn(self, f);
        self.in_test = outer;
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        for attr in &m.attrs {
            self.visit_attribute(attr);
        }
        if let Some((_, items)) = &m.content {
            self.current.push(m.ident.to_string());
            for item in items {
                self.visit_item(item);
            }
            self.current.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        for attr in &u.attrs {
            self.visit_attribute(attr);
        }
        let line = syn::spanned::Spanned::span(u).start().line;
        self.use_tree(&mut Vec::new(), &u.tree, line);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if p.segments.len() > 1 {
            let line = syn::spanned::Spanned::span(p).start().line;
            let segments = p.segments.iter().map(|s| s.ident.to_string()).collect();
            self.add(segments, line);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        let line = syn::spanned::Spanned::span(m).start().line;
        let tokens = m.tokens.to_string().replace(" :: ", "::");
        self.text_paths(&tokens, line);
        syn::visit::visit_macro(self, m);
    }

    fn visit_attribute(&mut self, attr: &'ast syn::Attribute) {
        if attr.path().is_ident("doc")
            && let syn::Meta::NameValue(nv) = &attr.meta
            && let syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) = &nv.value
        {
            let line = syn::spanned::Spanned::span(attr).start().line;
            self.text_paths(&s.value(), line);
        }
        syn::visit::visit_attribute(self, attr);
    }
}

/// Every module of `files` (one per file, and one per inline `mod` block).
fn modules_of(files: &[(SourceFile, String)]) -> BTreeSet<ModPath> {
    struct Inline<'a>(ModPath, &'a mut BTreeSet<ModPath>);
    impl<'ast> Visit<'ast> for Inline<'_> {
        fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
            if m.content.is_some() {
                self.0.push(m.ident.to_string());
                self.1.insert(self.0.clone());
                syn::visit::visit_item_mod(self, m);
                self.0.pop();
            }
        }
    }
    let mut modules = BTreeSet::new();
    for (file, text) in files {
        modules.insert(file.module.clone());
        let parsed = syn::parse_file(text).expect("parsed before");
        Inline(file.module.clone(), &mut modules).visit_file(&parsed);
    }
    modules
}

/// The file (its module) that holds `target`: the longest file module that is a prefix.
fn file_of<'a>(target: &ModPath, files: &'a [(SourceFile, String)]) -> Option<&'a SourceFile> {
    files
        .iter()
        .map(|(f, _)| f)
        .filter(|f| target.starts_with(&f.module))
        .max_by_key(|f| f.module.len())
}

/// The layer row of a top-level module.
fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.contains(&module))
}

/// What is wrong with the crate rooted at `root`: upward references (with `layered`), and
/// circles between the files of one top-level module. A file using its own descendants
/// (a `mod.rs` wiring its children) is not part of a circle; test code is left out.
fn check(root: &Path, layered: bool, read: &dyn Fn(&Path) -> Option<String>) -> Vec<String> {
    let files = crate_files(root, read);
    let modules = modules_of(&files);
    let mut problems = Vec::new();
    let mut edges: BTreeMap<&Path, BTreeSet<&Path>> = BTreeMap::new();
    for (file, text) in &files {
        let mut c = Collector {
            modules: &modules,
            current: file.module.clone(),
            in_test: file.test_only,
            refs: Vec::new(),
        };
        c.visit_file(&syn::parse_file(text).expect("parsed before"));
        let Some(top) = file.module.first() else {
            continue;
        };
        if layered && layer(top).is_none() {
            problems.push(format!("module `{top}` is in no row of LAYERS: add it"));
        }
        for r in c.refs.into_iter().filter(|r| !r.test) {
            let Some(target) = file_of(&r.target, &files) else {
                continue;
            };
            let Some(target_top) = target.module.first() else {
                continue;
            };
            let at = format!("{}:{}", file.path.display(), r.line);
            if target_top != top {
                if layered && layer(target_top) >= layer(top) {
                    problems.push(format!(
                        "{at}: `{}` names `{target_top}`, which is not below `{top}` in LAYERS",
                        r.text
                    ));
                }
                continue;
            }
            let wires_child = target.module.len() > file.module.len();
            if target.path != file.path && !wires_child {
                edges.entry(&file.path).or_default().insert(&target.path);
            }
        }
    }
    problems.extend(circles(&edges));
    problems
}

/// One message per circle of `edges` (each strongly connected set of more than one file).
fn circles(edges: &BTreeMap<&Path, BTreeSet<&Path>>) -> Vec<String> {
    let reach = |from: &Path| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from];
        while let Some(f) = todo.pop() {
            for &n in edges.get(f).into_iter().flatten() {
                if seen.insert(n) {
                    todo.push(n);
                }
            }
        }
        seen
    };
    let mut reported: BTreeSet<BTreeSet<&Path>> = BTreeSet::new();
    let mut out = Vec::new();
    for &from in edges.keys() {
        let from_reach = reach(from);
        if !from_reach.contains(from) {
            continue;
        }
        let circle: BTreeSet<&Path> = from_reach
            .into_iter()
            .filter(|f| reach(f).contains(from))
            .collect();
        if reported.insert(circle.clone()) {
            let names: Vec<String> = circle.iter().map(|p| p.display().to_string()).collect();
            out.push(format!("files that use each other: {}", names.join(", ")));
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn disk(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[test]
fn library_modules_use_only_lower_layers_and_files_form_no_circle() {
    let problems = check(&src().join("lib.rs"), true, &disk);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn command_line_files_form_no_circle() {
    let problems = check(&src().join("main.rs"), false, &disk);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Checks a made-up crate: `files` by path under `/src`.
fn check_made_up(files: &[(&str, &str)]) -> Vec<String> {
    let files: BTreeMap<PathBuf, String> = files
        .iter()
        .map(|(p, t)| (Path::new("/src").join(p), (*t).to_owned()))
        .collect();
    check(Path::new("/src/lib.rs"), true, &|p| files.get(p).cloned())
}

#[test]
fn an_upward_use_a_path_in_code_and_a_doc_link_are_each_refused() {
    let lib = "pub mod format; pub mod store;";
    let store = "pub fn f() {}";
    for format in [
        "use crate::store::f;",
        "pub fn g() { crate::store::f() }",
        "/// Called by [`crate::store::f`].\npub fn g() {}",
        "pub fn g() { assert!(crate::store::f() == ()) }",
    ] {
        let problems =
            check_made_up(&[("lib.rs", lib), ("format.rs", format), ("store.rs", store)]);
        assert_eq!(problems.len(), 1, "{format}: {problems:?}");
        assert!(problems[0].contains("names `store`"), "{problems:?}");
    }
    let in_tests = "pub fn g() {}\n#[cfg(test)]\nmod tests { use crate::store::f; }";
    let problems = check_made_up(&[
        ("lib.rs", lib),
        ("format.rs", in_tests),
        ("store.rs", store),
    ]);
    assert_eq!(problems, Vec::<String>::new(), "test code is left out");
    let downward = "use crate::format::g;";
    let format = "pub fn g() {}";
    let problems = check_made_up(&[
        ("lib.rs", lib),
        ("format.rs", format),
        ("store.rs", downward),
    ]);
    assert_eq!(problems, Vec::<String>::new());
}

#[test]
fn a_module_missing_from_the_table_is_named() {
    let problems = check_made_up(&[("lib.rs", "pub mod unlisted;"), ("unlisted.rs", "")]);
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].contains("`unlisted` is in no row"),
        "{problems:?}"
    );
}

#[test]
fn sibling_files_using_each_other_are_a_circle_and_a_parent_wiring_them_is_not() {
    let lib = "pub mod pipeline;";
    let mod_rs = "pub mod lanes; pub mod walk; pub struct Options;\n\
                  pub fn run() { walk::go(); lanes::go(); }";
    let walk = "use super::Options; pub fn go() { super::lanes::go() }";
    let lanes_ok = "pub fn go() {}";
    let lanes_circle = "use super::walk::go as w; pub fn go() { w() }";
    let files = |lanes| {
        [
            ("lib.rs", lib),
            ("pipeline/mod.rs", mod_rs),
            ("pipeline/walk.rs", walk),
            ("pipeline/lanes.rs", lanes),
        ]
    };
    assert_eq!(check_made_up(&files(lanes_ok)), Vec::<String>::new());
    let problems = check_made_up(&files(lanes_circle));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("lanes.rs") && problems[0].contains("walk.rs"),
        "{problems:?}"
    );
}
