//! The hook's view of narflow's config file (`/etc/narflow/narflow.toml`, or `--config
//! FILE`, or `$NARFLOW_CONFIG`): exactly the three keys it needs, top-level `socket` and
//! `state-dir`, and `timeout` in the table `[hook]` (or `hook.timeout` at the top).
//!
//! A reader of exactly those keys, not a TOML parser (the `toml` crate would take
//! `narflow-hook` past its 600 KB budget). What it reads: `[table]` headers, one-line
//! `key = value` with a basic (`"..."`, with escapes) or literal (`'...'`) string, or an
//! integer or float, and `#` comments; it skips the lines of multi-line strings and
//! arrays, so no text inside them is taken for a key. Every other key and construct
//! belongs to the other commands, whose full parser checks the whole file.
//!
//! Nothing here fails: a file the hook cannot read, or a value it cannot use, costs the
//! hook that file or that key, never the hand-off. Each problem is one warning naming the
//! file, the line and the key, for the caller to print to the build log.
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The config file read when neither `--config` nor `$NARFLOW_CONFIG` names one.
pub const DEFAULT_CONFIG: &str = "/etc/narflow/narflow.toml";
/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "NARFLOW_CONFIG";

/// The hook's settings from the config file; `None` where the file says nothing usable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookFileSettings {
    /// Top-level `socket`.
    pub socket: Option<PathBuf>,
    /// Top-level `state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `timeout` in `[hook]`, in seconds.
    pub timeout: Option<Duration>,
}

/// Reads the config file: `explicit` (from `--config` or `$NARFLOW_CONFIG`) when given,
/// else [`DEFAULT_CONFIG`] if it exists (a machine without one is normal and quiet).
/// Returns what it could use and one warning per problem.
pub fn load(explicit: Option<&Path>) -> (HookFileSettings, Vec<String>) {
    let path = explicit.unwrap_or(Path::new(DEFAULT_CONFIG));
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) if explicit.is_none() && e.kind() == std::io::ErrorKind::NotFound => {
            (HookFileSettings::default(), Vec::new())
        }
        Err(e) => (
            HookFileSettings::default(),
            vec![format!("{}: {e}; config file ignored", path.display())],
        ),
    }
}

/// Parses the text of the config file at `path` (named in the warnings).
pub fn parse(path: &Path, text: &str) -> (HookFileSettings, Vec<String>) {
    let mut found = HookFileSettings::default();
    let mut warnings = Vec::new();
    let mut table = String::new();
    // The closing delimiter of a multi-line string or array whose lines are skipped.
    let mut skip: Option<Skip> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        if let Some(s) = skip.take() {
            skip = s.resume(raw);
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            // `[[array of tables]]` is no table the hook reads.
            table = match line.strip_prefix('[').and_then(|l| l.split_once(']')) {
                Some((name, _)) if !line.starts_with("[[") => unquote_key(name.trim()),
                _ => String::from("[["),
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let (key, value) = (unquote_key(key.trim()), value.trim());
        let full = match (table.as_str(), key.as_str()) {
            ("", k) => k.to_owned(),
            (t, k) => format!("{t}.{k}"),
        };
        let mut warn = |why: String| {
            warnings.push(format!(
                "{}:{line_no}: {full}: {why}; ignored",
                path.display()
            ));
        };
        match full.as_str() {
            "socket" | "state-dir" => match string_value(value) {
                Ok(p) if p.is_empty() => warn("empty path".to_owned()),
                Ok(p) if full == "socket" => found.socket = Some(p.into()),
                Ok(p) => found.state_dir = Some(p.into()),
                Err(why) => warn(why),
            },
            "hook.timeout" => match seconds_value(value) {
                Ok(t) => found.timeout = Some(t),
                Err(why) => warn(why),
            },
            _ => skip = Skip::after(value),
        }
    }
    (found, warnings)
}

/// A multi-line value being skipped.
#[derive(Debug, Clone, Copy)]
enum Skip {
    /// A string closed by `"""` or `'''`.
    String(&'static str),
    /// An array or inline table, `depth` brackets deep.
    Brackets(usize),
}

impl Skip {
    /// Whether the value that starts a line as `value` goes on to the next lines.
    fn after(value: &str) -> Option<Skip> {
        for quote in ["\"\"\"", "'''"] {
            if let Some(rest) = value.strip_prefix(quote) {
                return (!rest.contains(quote)).then_some(Skip::String(quote));
            }
        }
        if value.starts_with(['[', '{']) {
            return Skip::Brackets(0).resume(value);
        }
        None
    }

    /// The skip still open after `line`, or `None` when the value ends on it.
    fn resume(self, line: &str) -> Option<Skip> {
        match self {
            Skip::String(quote) => (!line.contains(quote)).then_some(self),
            Skip::Brackets(mut depth) => {
                let mut in_str: Option<char> = None;
                let mut chars = line.chars();
                while let Some(c) = chars.next() {
                    match (in_str, c) {
                        (Some('"'), '\\') => {
                            chars.next();
                        }
                        (Some(q), c) if c == q => in_str = None,
                        (Some(_), _) => {}
                        (None, '"' | '\'') => in_str = Some(c),
                        (None, '#') => break,
                        (None, '[' | '{') => depth += 1,
                        (None, ']' | '}') => depth = depth.saturating_sub(1),
                        _ => {}
                    }
                }
                (depth > 0).then_some(Skip::Brackets(depth))
            }
        }
    }
}

/// A key or table name without its quotes (`"state-dir"` is `state-dir`).
fn unquote_key(k: &str) -> String {
    let dequoted = k
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .or_else(|| k.strip_prefix('\'').and_then(|k| k.strip_suffix('\'')));
    dequoted.unwrap_or(k).to_owned()
}

/// `value` without a trailing `# comment`, for a value with no string in it.
fn strip_comment(value: &str) -> &str {
    value.split_once('#').map_or(value, |(v, _)| v).trim_end()
}

/// A one-line TOML string: basic (`"..."`, with its escapes) or literal (`'...'`),
/// followed by nothing but a comment.
fn string_value(value: &str) -> Result<String, String> {
    let not_string = || {
        format!(
            "expected a path (a one-line string), found `{}`",
            super::protocol::truncate(value, 40)
        )
    };
    let rest_ok = |rest: &str| {
        let rest = rest.trim_start();
        rest.is_empty() || rest.starts_with('#')
    };
    if let Some(body) = value.strip_prefix('\'') {
        let (s, rest) = body.split_once('\'').ok_or_else(not_string)?;
        return if rest_ok(rest) && !value.starts_with("'''") {
            Ok(s.to_owned())
        } else {
            Err(not_string())
        };
    }
    let body = value.strip_prefix('"').ok_or_else(not_string)?;
    if body.starts_with("\"\"") {
        return Err(not_string());
    }
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                return if rest_ok(&body[i + 1..]) {
                    Ok(out)
                } else {
                    Err(not_string())
                };
            }
            '\\' => {
                let (_, e) = chars.next().ok_or_else(not_string)?;
                let hex = |n: usize, chars: &mut std::str::CharIndices<'_>| {
                    let h: String = chars.by_ref().take(n).map(|(_, c)| c).collect();
                    u32::from_str_radix(&h, 16)
                        .ok()
                        .filter(|_| h.len() == n)
                        .and_then(char::from_u32)
                        .ok_or_else(|| format!("bad escape \\{e}{h}"))
                };
                out.push(match e {
                    'b' => '\u{8}',
                    't' => '\t',
                    'n' => '\n',
                    'f' => '\u{c}',
                    'r' => '\r',
                    'e' => '\u{1b}',
                    '"' => '"',
                    '\\' => '\\',
                    'u' => hex(4, &mut chars)?,
                    'U' => hex(8, &mut chars)?,
                    other => return Err(format!("bad escape \\{other}")),
                });
            }
            c => out.push(c),
        }
    }
    Err(not_string())
}

/// A TOML integer or float, in seconds.
fn seconds_value(value: &str) -> Result<Duration, String> {
    let v = strip_comment(value);
    let digits: String = v.chars().filter(|&c| c != '_').collect();
    let secs = if v.starts_with(['"', '\'']) || v.is_empty() {
        None
    } else {
        digits.parse::<f64>().ok().filter(|s| s.is_finite())
    };
    match secs {
        None if v.starts_with(['"', '\'']) => {
            Err("expected a number of seconds, found a string".to_owned())
        }
        None => Err(format!(
            "not a number of seconds: `{}`",
            super::protocol::truncate(v, 40)
        )),
        Some(s) => Duration::try_from_secs_f64(s)
            .map_err(|_| format!("not a number of seconds (≥ 0): `{v}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> (HookFileSettings, Vec<String>) {
        parse(Path::new("/etc/narflow/narflow.toml"), text)
    }

    #[test]
    fn the_three_keys_are_read_and_the_rest_left_to_other_commands() {
        let (s, w) = parsed(
            "to = \"s3://b\"\nsocket = \"/run/x.sock\"\nstate-dir = '/var/lib/x'\n\
             [daemon]\nsocket = \"/not/this\"\n[hook]\ntimeout = 0.25\n",
        );
        assert_eq!(w, Vec::<String>::new());
        assert_eq!(
            s,
            HookFileSettings {
                socket: Some("/run/x.sock".into()),
                state_dir: Some("/var/lib/x".into()),
                timeout: Some(Duration::from_millis(250)),
            }
        );
        let (s, _) = parsed("[hook]\ntimeout = 3\n");
        assert_eq!(s.timeout, Some(Duration::from_secs(3)));
    }

    #[test]
    fn a_bad_value_costs_that_key_with_its_line() {
        let (s, w) = parsed("socket = 5\nstate-dir = \"/d\"\n[hook]\ntimeout = -1\n");
        assert_eq!(s.socket, None);
        assert_eq!(s.state_dir, Some("/d".into()));
        assert_eq!(s.timeout, None);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("/etc/narflow/narflow.toml:1: socket: expected a path"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("/etc/narflow/narflow.toml:4: hook.timeout: not a number"),
            "{w:?}"
        );
        let (s, w) = parsed("hook.timeout = \"2\"\n");
        assert_eq!(s.timeout, None);
        assert!(
            w[0].contains(":1: hook.timeout: expected a number"),
            "{w:?}"
        );
    }

    #[test]
    fn a_broken_value_is_named_with_its_line_and_the_rest_is_kept() {
        let (s, w) = parsed("socket = \"/s\"\n\nstate-dir = \n");
        assert_eq!(s.socket, Some("/s".into()));
        assert_eq!(s.state_dir, None);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("/etc/narflow/narflow.toml:3: state-dir: expected a path"),
            "{w:?}"
        );
        assert!(w[0].ends_with("ignored"), "{w:?}");
    }

    #[test]
    fn strings_comments_and_multi_line_values_of_other_keys() {
        let (s, w) = parsed(
            "# narflow\n\"socket\" = \"/run/a\\u00e9\\\"b\" # the daemon's\n\
             key-file = [\n  [\"hook\"], # ]\ntimeout = 99\n]\n\
             description = \"\"\"\nsocket = \"/evil\"\n\"\"\"\n\
             state-dir = '/var/lib/C:\\x' \n[[upstream]]\ntimeout = 9\n\
             [ hook ]\ntimeout = 1_0 # seconds\n",
        );
        assert_eq!(w, Vec::<String>::new());
        assert_eq!(s.socket, Some("/run/a\u{e9}\"b".into()));
        assert_eq!(s.state_dir, Some("/var/lib/C:\\x".into()));
        assert_eq!(s.timeout, Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_named_file_that_is_missing_is_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        let (s, w) = load(Some(&missing));
        assert_eq!(s, HookFileSettings::default());
        assert!(
            w[0].contains("none.toml") && w[0].contains("ignored"),
            "{w:?}"
        );
        let file = dir.path().join("narflow.toml");
        std::fs::write(&file, "[hook]\ntimeout = 1.5\n").unwrap();
        let (s, w) = load(Some(&file));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.timeout, Some(Duration::from_millis(1500)));
    }
}
