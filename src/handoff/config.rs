//! The hook's view of narflow's config file (`/etc/narflow/narflow.toml`, or `--config
//! FILE`, or `$NARFLOW_CONFIG`): exactly the three keys it needs, top-level `socket` and
//! `state-dir`, and `timeout` in the table `[hook]`.
//!
//! Parsed with `toml`'s span-keeping document parser and without serde, so the hook
//! stays std-only in spirit (no runtime, no optional dependency). Every other key
//! belongs to the other commands and is checked by them, not here.
//!
//! Nothing here fails: a file the hook cannot read or use costs the hook that file (or
//! that key), never the hand-off. Each problem is one warning naming the file, the line
//! and the key, for the caller to print to the build log.
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::de::{DeTable, DeValue};

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
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc.into_inner(),
        Err(e) => {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            let why = e.message().trim_end();
            warnings.push(format!(
                "{}:{line}: not TOML: {why}; config file ignored",
                path.display()
            ));
            return (found, warnings);
        }
    };
    // (line, message): the table is in key order, the warnings go out in file order.
    let mut bad: Vec<(usize, String)> = Vec::new();
    let mut warn = |span: std::ops::Range<usize>, key: &str, why: String| {
        let line = line_of(text, span.start);
        bad.push((
            line,
            format!("{}:{line}: {key}: {why}; ignored", path.display()),
        ));
    };
    for (key, value) in doc.iter() {
        match key.get_ref().as_ref() {
            "socket" => match path_value(value.get_ref()) {
                Ok(p) => found.socket = Some(p),
                Err(why) => warn(value.span(), "socket", why),
            },
            "state-dir" => match path_value(value.get_ref()) {
                Ok(p) => found.state_dir = Some(p),
                Err(why) => warn(value.span(), "state-dir", why),
            },
            "hook" => {
                let DeValue::Table(hook) = value.get_ref() else {
                    let why = format!("expected a table, found {}", value.get_ref().type_str());
                    warn(value.span(), "hook", why);
                    continue;
                };
                for (key, value) in hook.iter() {
                    if key.get_ref().as_ref() == "timeout" {
                        match seconds_value(value.get_ref()) {
                            Ok(t) => found.timeout = Some(t),
                            Err(why) => warn(value.span(), "hook.timeout", why),
                        }
                    }
                }
            }
            _ => {}
        }
    }
    bad.sort_by_key(|(line, _)| *line);
    warnings.extend(bad.into_iter().map(|(_, w)| w));
    (found, warnings)
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn path_value(v: &DeValue<'_>) -> Result<PathBuf, String> {
    match v {
        DeValue::String(s) if !s.is_empty() => Ok(PathBuf::from(s.as_ref())),
        DeValue::String(_) => Err("empty path".to_owned()),
        other => Err(format!(
            "expected a path (a string), found {}",
            other.type_str()
        )),
    }
}

fn seconds_value(v: &DeValue<'_>) -> Result<Duration, String> {
    let secs = match v {
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .ok()
            .map(|n| n as f64),
        DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
        other => {
            return Err(format!(
                "expected a number of seconds, found {}",
                other.type_str()
            ));
        }
    };
    secs.and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| "not a number of seconds (≥ 0)".to_owned())
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
        let (_, w) = parsed("hook = 1\n");
        assert!(w[0].contains(":1: hook: expected a table"), "{w:?}");
    }

    #[test]
    fn a_file_that_is_not_toml_is_ignored_with_its_line() {
        let (s, w) = parsed("socket = \"/s\"\n\nstate-dir = \n");
        assert_eq!(s, HookFileSettings::default());
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("/etc/narflow/narflow.toml:3: not TOML: "),
            "{w:?}"
        );
        assert!(w[0].ends_with("config file ignored"), "{w:?}");
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
