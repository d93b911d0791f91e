//! The config file: which one a run reads ([`ConfigChoice`]), and reading it
//! ([`ConfigFile`]): TOML whose keys are the settings' file keys, each value read by its
//! setting's own reader, each key remembered with its line. It never merges layers.
use super::table::{FileValue, KEYS, Settings, tables};
use super::{SettingsError, Source};
use crate::handoff::config::{CONFIG_ENV, DEFAULT_CONFIG};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A parsed config file: its settings, and the line of each key it sets.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub settings: Settings,
    lines: BTreeMap<&'static str, usize>,
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl ConfigFile {
    /// Reads the config file at `path`. A missing file is `Ok(None)` when `required` is
    /// false (the default file), an error otherwise (a file the user named).
    ///
    /// # Errors
    /// [`SettingsError`] naming the file (and line and key, for what is in it).
    pub fn load(path: &Path, required: bool) -> Result<Option<ConfigFile>, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => ConfigFile::parse(path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
            Err(error) => Err(SettingsError::Read {
                path: path.to_owned(),
                error,
            }),
        }
    }

    /// Parses config file text (`path` is for messages and sources).
    ///
    /// # Errors
    /// [`SettingsError::Syntax`], [`SettingsError::UnknownKey`] or
    /// [`SettingsError::BadValue`], each with its line.
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, SettingsError> {
        let syntax = |e: toml::de::Error| SettingsError::Syntax {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: e.message().to_owned(),
        };
        let doc = toml::de::DeTable::parse(text).map_err(syntax)?;
        // Every key with its line and its value.
        let mut found: Vec<(&'static str, usize, &FileValue<'_>)> = Vec::new();
        let tables = tables();
        let unknown = |key: String, at: usize, table: Option<&str>| {
            let known: Vec<String> = KEYS
                .iter()
                .filter_map(|k| match (table, k.name.split_once('.')) {
                    (None, None) => Some(k.name.to_owned()),
                    (Some(t), Some((kt, name))) if t == kt => Some(name.to_owned()),
                    _ => None,
                })
                .chain(
                    table
                        .is_none()
                        .then(|| tables.iter().map(|t| format!("[{t}]")))
                        .into_iter()
                        .flatten(),
                )
                .collect();
            SettingsError::UnknownKey {
                path: path.to_owned(),
                line: line_of(text, at),
                key,
                known: known.join(", "),
            }
        };
        for (k, v) in doc.get_ref() {
            let name = k.get_ref().as_ref();
            if tables.contains(&name) {
                let Some(table) = v.get_ref().as_table() else {
                    return Err(SettingsError::BadValue {
                        path: path.to_owned(),
                        line: line_of(text, k.span().start),
                        key: name.to_owned(),
                        message: format!(
                            "expected a table ([{name}]), found a {}",
                            v.get_ref().type_str()
                        ),
                    });
                };
                for (k2, v2) in table {
                    let full = format!("{name}.{}", k2.get_ref());
                    let Some(key) = KEYS.iter().find(|key| key.name == full) else {
                        return Err(unknown(full, k2.span().start, Some(name)));
                    };
                    found.push((key.name, line_of(text, k2.span().start), v2));
                }
            } else {
                let Some(key) = KEYS
                    .iter()
                    .find(|key| key.name == name && key.table().is_none())
                else {
                    return Err(unknown(name.to_owned(), k.span().start, None));
                };
                found.push((key.name, line_of(text, k.span().start), v));
            }
        }
        let mut settings = Settings::default();
        for (key, line, value) in &found {
            let read = settings
                .read_file_value(key, value)
                .expect("every key found is a setting's");
            read.map_err(|message| SettingsError::BadValue {
                path: path.to_owned(),
                line: *line,
                key: (*key).to_owned(),
                message,
            })?;
        }
        Ok(ConfigFile {
            path: path.to_owned(),
            settings,
            lines: found.into_iter().map(|(k, line, _)| (k, line)).collect(),
        })
    }

    /// The line that sets `key`, if the file sets it.
    pub fn line(&self, key: &str) -> Option<usize> {
        self.lines.get(key).copied()
    }
}

/// Which config file a run uses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChoice {
    pub path: PathBuf,
    /// `flag:--config`, `env:NARFLOW_CONFIG` or `default`.
    pub source: Source,
}

impl ConfigChoice {
    /// `--config` (given as `flag`, with clap's view of where it came from) or the
    /// default file.
    pub fn new(flag: Option<PathBuf>, from_env: bool) -> ConfigChoice {
        match flag {
            Some(path) if from_env => ConfigChoice {
                path,
                source: Source::Env(CONFIG_ENV.into()),
            },
            Some(path) => ConfigChoice {
                path,
                source: Source::Flag("--config".into()),
            },
            None => ConfigChoice {
                path: PathBuf::from(DEFAULT_CONFIG),
                source: Source::Default,
            },
        }
    }

    /// Reads the chosen file: the default one may be missing, a named one may not.
    ///
    /// # Errors
    /// See [`ConfigFile::load`].
    pub fn load(&self) -> Result<Option<ConfigFile>, SettingsError> {
        ConfigFile::load(&self.path, self.source != Source::Default)
    }
}
