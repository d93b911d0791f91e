//! The value types of settings and how each is read: sizes (`64M`), seconds (`2.5`),
//! groups (a name or a number), compressions and `--watch-store`'s choice, from a flag,
//! a variable or the config file alike. Parsing only: nothing here knows a setting's key.
use crate::format::compression::Compression;
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Which new valid paths `narflow daemon --watch-store` queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchStore {
    /// Paths Nix built on this machine (`ultimate = 1` in its database).
    Built,
    /// Every path that becomes valid (built, substituted, added, copied in).
    All,
}

impl WatchStore {
    /// The value as written: `built` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchStore::Built => "built",
            WatchStore::All => "all",
        }
    }
}

/// Where push and backfill record their unfinished multipart uploads to S3
/// (`upload-journal`): a file, or `off` (no resume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalFile {
    Off,
    File(PathBuf),
}

impl FromStr for JournalFile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(JournalFile::Off),
            "" => Err("give a file, or off".to_owned()),
            path => Ok(JournalFile::File(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for JournalFile {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            JournalFile::Off => f.write_str("off"),
            JournalFile::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for JournalFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A size in bytes: a number, or one with K, M, G, T (powers of 1024; KB, KiB, MB, MiB
/// ... are read as powers of 1024 too), e.g. `64M`, `1G`, `1.5G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(Size)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: a number of bytes, or a string such as \"64M\" or \"1G\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("{v} is not a size: it is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses a size: bytes, or a number with K, M, G or T, all powers of 1024 (so `64M` is
/// 64 MiB; `MB` and `MiB` are read the same way).
///
/// # Errors
/// A message naming the text and the form expected.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const BINARY: parse_size::Config = parse_size::Config::new().with_binary();
    BINARY.parse_size(s.trim()).map_err(|e| {
        format!("{s:?} is not a size ({e}): give bytes, or K, M, G (powers of 1024), e.g. 64M")
    })
}

/// A size for people: `64 MiB`, `1.5 GiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// A duration given in seconds (`30`, `2.5`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub Duration);

impl FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<f64>()
            .ok()
            .and_then(|f| Duration::try_from_secs_f64(f).ok())
            .map(Seconds)
            .ok_or_else(|| format!("{s:?} is not a number of seconds (e.g. 30 or 2.5)"))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of seconds, 0 or more")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Seconds, E> {
                Duration::try_from_secs_f64(v)
                    .map(Seconds)
                    .map_err(|_| E::custom(format!("{v} is not a number of seconds, 0 or more")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(|s| Seconds(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("{v} is not a number of seconds, 0 or more")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(Duration::from_secs(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Seconds, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration given with its unit (`24h`, `30m`, `7d`, `90s`, `1h 30m`), or as seconds
/// (`0`, `2.5`). Units as the `humantime` crate reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(Seconds(d)) = t.parse::<Seconds>() {
            return Ok(Span(d));
        }
        humantime::parse_duration(t).map(Span).map_err(|e| {
            format!("{s:?} is not a duration ({e}): give e.g. 24h, 30m, 7d, or seconds")
        })
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration: a string such as \"24h\" or \"30m\", or seconds")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Span, E> {
                Seconds::deserialize(serde::de::value::F64Deserializer::<E>::new(v))
                    .map(|s| Span(s.0))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Span, E> {
                Seconds::deserialize(serde::de::value::I64Deserializer::<E>::new(v))
                    .map(|s| Span(s.0))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Span, E> {
                Ok(Span(Duration::from_secs(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Span, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A compression by name (`zstd`, `xz`, `none`), as `--compression` takes it.
pub(super) fn de_compression<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Compression, D::Error> {
    let s = String::deserialize(d)?;
    Compression::parse(&s).map_err(serde::de::Error::custom)
}

/// A group, as a name (`"nixbld"`) or a number (`30000` or `"30000"`).
pub(super) fn de_name_or_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a group name or number")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}
