//! Nix store-URL syntax for binary caches: `file:///dir?key=value&...` and
//! `s3://bucket?region=..&endpoint=..&...`, so narflow can stand in for `nix copy --to`.
//!
//! Parsing only: this module never touches the file system or the network.
use crate::format::cache_info::CacheInfoWanted;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cache URL {url:?}: {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

/// Where a cache lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLocation {
    /// A directory on the local file system.
    File(PathBuf),
    /// An S3 bucket (endpoint, region etc. are in the parameters).
    S3 { bucket: String },
}

/// A parsed store URL: the location and its `?key=value` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUrl {
    pub location: CacheLocation,
    pub params: BTreeMap<String, String>,
    /// The URL as given, for messages.
    pub original: String,
}

/// Parameters Nix or narflow understand; anything else is refused so a typo is not ignored.
const KNOWN_PARAMS: &[&str] = &[
    "compression",
    "compression-level",
    "secret-key",
    "priority",
    "want-mass-query",
    "write-nar-listing",
    "region",
    "endpoint",
    "profile",
    "scheme",
    "addressing-style",
    "storage-class",
    // narflow's own tuning for S3:
    "concurrency",
    "retries",
    "read-timeout",
];

/// Nix parameters that narflow refuses, with why: each tunes something narflow decides
/// itself, and accepting them while doing otherwise would mislead.
const REFUSED_PARAMS: &[(&str, &str)] = &[
    (
        "parallel-compression",
        "narflow always compresses in parallel, each chunk of a NAR on its own thread \
         (--jobs sets how many)",
    ),
    (
        "multipart-upload",
        "narflow always sends a NAR larger than one part as a multipart upload",
    ),
    (
        "buffer-size",
        "narflow sizes multipart upload parts itself, from the NAR's size and the --memory \
         budget",
    ),
];

/// A Boolean setting as Nix spells it.
fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!(
            "parameter {key}={v:?} is not a Boolean (true, false, 1, 0, yes or no)"
        )),
    }
}

fn parse_priority(v: &str) -> Result<u32, String> {
    v.parse().map_err(|_| {
        format!("parameter priority={v:?} is not a whole number from 0 up (lower is preferred)")
    })
}

impl CacheUrl {
    /// Parses a store URL.
    ///
    /// # Errors
    /// [`UrlError`] naming the URL and what is wrong with it.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let err = |reason: String| UrlError {
            url: url.to_owned(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| err("expected file:///DIR or s3://BUCKET".into()))?;
        let (body, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut params = BTreeMap::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| err(format!("parameter {pair:?} has no `=`")))?;
            let (k, v) = (
                percent_decode(k).map_err(&err)?,
                percent_decode(v).map_err(&err)?,
            );
            if let Some((_, why)) = REFUSED_PARAMS.iter().find(|(name, _)| *name == k) {
                return Err(err(format!("parameter {k:?} is not supported: {why}")));
            }
            if !KNOWN_PARAMS.contains(&k.as_str()) {
                return Err(err(format!("unknown parameter {k:?}")));
            }
            match k.as_str() {
                "priority" => parse_priority(&v).map(drop),
                "want-mass-query" | "write-nar-listing" => parse_bool(&k, &v).map(drop),
                _ => Ok(()),
            }
            .map_err(&err)?;
            if params.insert(k.clone(), v).is_some() {
                return Err(err(format!("parameter {k:?} given twice")));
            }
        }
        let location = match scheme {
            "file" => {
                let dir = percent_decode(body).map_err(&err)?;
                if !dir.starts_with('/') {
                    return Err(err(
                        "a file:// cache needs an absolute directory (file:///DIR)".into(),
                    ));
                }
                CacheLocation::File(PathBuf::from(dir))
            }
            "s3" => {
                if body.is_empty() || body.contains('/') {
                    return Err(err("expected s3://BUCKET with no path".into()));
                }
                CacheLocation::S3 {
                    bucket: body.to_owned(),
                }
            }
            other => return Err(err(format!("unsupported scheme {other:?} (file or s3)"))),
        };
        Ok(CacheUrl {
            location,
            params,
            original: url.to_owned(),
        })
    }

    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// `write-nar-listing=`: whether each uploaded path gets its `<hash part>.ls` listing
    /// (default: no, as in Nix).
    pub fn write_nar_listing(&self) -> bool {
        self.param("write-nar-listing")
            .is_some_and(|v| parse_bool("write-nar-listing", v) == Ok(true))
    }

    /// What the cache's `nix-cache-info` must say by `priority=` and `want-mass-query=`;
    /// a parameter not given leaves the cache's own value.
    pub fn cache_info_wanted(&self) -> CacheInfoWanted {
        // Both were checked by `parse`.
        CacheInfoWanted {
            want_mass_query: self
                .param("want-mass-query")
                .and_then(|v| parse_bool("want-mass-query", v).ok()),
            priority: self.param("priority").and_then(|v| parse_priority(v).ok()),
        }
    }
}

/// Decodes `%XX` escapes. Unlike `percent_encoding`, which keeps a malformed escape as it
/// is, a `%` not followed by two hex digits is refused: in a URL it is a typo, and the
/// value meant is unknown.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let malformed = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(format!("bad percent escape in {s:?}"));
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_s3() {
        let u =
            CacheUrl::parse("file:///var/cache/nix?compression=xz&compression-level=9").unwrap();
        assert_eq!(u.location, CacheLocation::File("/var/cache/nix".into()));
        assert_eq!(
            (u.param("compression"), u.param("compression-level")),
            (Some("xz"), Some("9"))
        );
        let u = CacheUrl::parse(
            "s3://my-cache?region=eu-west-1&endpoint=http%3A%2F%2F127.0.0.1%3A3900",
        )
        .unwrap();
        assert_eq!(
            u.location,
            CacheLocation::S3 {
                bucket: "my-cache".into()
            }
        );
        assert_eq!(u.param("endpoint"), Some("http://127.0.0.1:3900"));
        let u = CacheUrl::parse("file:///a%20b%2Fc?secret-key=%2Fk%C3%A9y").unwrap();
        assert_eq!(u.location, CacheLocation::File("/a b/c".into()));
        assert_eq!(u.param("secret-key"), Some("/kéy"));
    }

    #[test]
    fn errors_name_the_problem() {
        for (url, reason) in [
            ("/tmp/cache", "expected file:///DIR"),
            ("file://relative/dir", "absolute directory"),
            ("http://example", "unsupported scheme \"http\""),
            (
                "file:///x?compresion=xz",
                "unknown parameter \"compresion\"",
            ),
            ("file:///x?compression", "has no `=`"),
            ("file:///x?compression=xz&compression=zstd", "given twice"),
            ("s3://", "expected s3://BUCKET"),
            ("file:///x%zz", "bad percent escape"),
            ("file:///x%4", "bad percent escape"),
            ("file:///x%ff", "is not UTF-8 once decoded"),
            (
                "file:///x?parallel-compression=true",
                "\"parallel-compression\" is not supported: narflow always compresses in parallel",
            ),
            (
                "s3://b?multipart-upload=true",
                "\"multipart-upload\" is not supported: narflow always sends a NAR larger than one part",
            ),
            (
                "s3://b?buffer-size=5242880",
                "\"buffer-size\" is not supported: narflow sizes multipart upload parts itself",
            ),
            (
                "file:///x?priority=high",
                "priority=\"high\" is not a whole number",
            ),
            (
                "file:///x?priority=-1",
                "priority=\"-1\" is not a whole number",
            ),
            (
                "file:///x?want-mass-query=maybe",
                "want-mass-query=\"maybe\" is not a Boolean",
            ),
            (
                "file:///x?write-nar-listing=2",
                "write-nar-listing=\"2\" is not a Boolean",
            ),
        ] {
            let e = CacheUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(url) && e.contains(reason), "{url}: {e}");
        }
    }

    #[test]
    fn listing_and_cache_info_parameters() {
        let u = CacheUrl::parse("file:///x").unwrap();
        assert!(!u.write_nar_listing());
        assert_eq!(u.cache_info_wanted(), CacheInfoWanted::default());
        for (v, on) in [
            ("1", true),
            ("true", true),
            ("yes", true),
            ("0", false),
            ("no", false),
        ] {
            let u = CacheUrl::parse(&format!("file:///x?write-nar-listing={v}")).unwrap();
            assert_eq!(u.write_nar_listing(), on, "{v}");
        }
        let u = CacheUrl::parse("s3://b?priority=10&want-mass-query=false").unwrap();
        assert_eq!(
            u.cache_info_wanted(),
            CacheInfoWanted {
                want_mass_query: Some(false),
                priority: Some(10)
            }
        );
    }
}
