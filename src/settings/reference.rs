//! The manual's configuration reference (`docs/src/configuration.md`), written from the
//! one settings list ([`KEYS`]): each key's file key, flag, variable, type, default and
//! description. A test compares the committed page with what this writes, so the manual
//! cannot drift from the code. Nothing here reads or merges settings.
use super::table::{KEYS, Key};

/// The page's path in the repository.
pub const REFERENCE_PAGE: &str = "docs/src/configuration.md";

/// The command that writes the page again from the code.
pub const REGENERATE: &str = "NARFLOW_UPDATE_DOCS=1 cargo test --lib \
                              settings::tests::the_configuration_reference_is_written_from_the_settings_list";

/// The configuration reference page, in Markdown.
pub fn reference_markdown() -> String {
    let mut out = String::new();
    out.push_str("# Configuration reference\n\n");
    out.push_str(&format!(
        "<!-- Written from the settings list in src/settings/table.rs: do not edit by hand.\n     \
         Regenerate with: {REGENERATE} -->\n\n"
    ));
    out.push_str(
        "Every setting narflow reads, in the order `narflow config` prints them. For each, \
         the highest layer that gives it wins: a flag, then its `NARFLOW_*` variable, then \
         its key in the config file (`/etc/narflow/narflow.toml`, or the file named by \
         `--config FILE` or `NARFLOW_CONFIG`), then the store URL's parameter where one is \
         named, then the default. A key written `table.key` sits in the file's `[table]` \
         (`s3.part-size` is `part-size` under `[s3]`). How the layers merge, which command \
         reads which keys, and `narflow config`: [Settings](settings.md).\n\n",
    );
    out.push_str("| file key | flag | variable | default |\n|---|---|---|---|\n");
    for key in KEYS.iter() {
        out.push_str(&format!(
            "| [`{}`](#{}) | `--{}` | `{}` | {} |\n",
            key.name,
            anchor(key),
            key.flag,
            key.env,
            cell(&default_text(key)),
        ));
    }
    let mut cmd = {
        use clap::Args;
        super::Settings::augment_args(clap::Command::new("narflow"))
    };
    cmd.build();
    for key in KEYS.iter() {
        // A flag whose value may be left out (`--unsigned`, `--watch-store`) is written
        // `--flag[=VALUE]`, as it is given on the command line.
        let optional = cmd
            .get_arguments()
            .find(|a| a.get_id() == key.id)
            .and_then(|a| a.get_num_args())
            .is_some_and(|n| n.min_values() == 0);
        let value = if optional {
            format!("[={}]", key.value_name)
        } else {
            format!(" {}", key.value_name)
        };
        out.push_str(&format!("\n## `{}`\n\n", key.name));
        out.push_str(&format!("{}.\n\n", markdown(&sentence(key.help))));
        out.push_str(&format!(
            "- flag: `--{}{value}`{}\n",
            key.flag,
            if key.hidden {
                " (not shown by `--help`)"
            } else {
                ""
            }
        ));
        out.push_str(&format!("- variable: `{}`\n", key.env));
        out.push_str(&format!("- type: {}\n", key.kind()));
        out.push_str(&format!("- default: {}\n", markdown(&default_text(key))));
    }
    out
}

/// The heading's id as mdBook (and GitHub) make it: lower case, spaces to `-`, other
/// punctuation dropped.
fn anchor(key: &Key) -> String {
    key.name
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// A table cell: `|` escaped.
fn cell(text: &str) -> String {
    markdown(text).replace('|', "\\|")
}

/// Plain text as Markdown: a `<` outside code spans escaped, so `log/<drv name>` is not
/// read as an HTML tag.
fn markdown(text: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    for c in text.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                out.push(c);
            }
            '<' if !in_code => out.push_str("&lt;"),
            c => out.push(c),
        }
    }
    out
}

/// A description as a sentence: capitalised, without a closing full stop of its own.
fn sentence(help: &str) -> String {
    let mut chars = help.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect::<String>(),
        None => String::new(),
    }
    .trim_end_matches('.')
    .to_owned()
}

/// The default in words, with the URL's parameter when it fills the setting in.
fn default_text(key: &Key) -> String {
    use super::table::Fallback;
    match key.default {
        Fallback::Value(v) => format!("`{v}`"),
        Fallback::Words(w) => w.to_owned(),
        Fallback::Url(p, v) => format!("the store URL's `{p}=`, else `{v}`"),
        Fallback::UrlWords(p, w) => format!("the store URL's `{p}=`, else {w}"),
        Fallback::UrlAdds(p) => format!("none; the store URL's `{p}=` adds one"),
    }
}
