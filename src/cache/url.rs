//! Nix store-URL syntax for binary caches: `file:///dir?key=value&...` and
//! `s3://bucket?region=..&endpoint=..&...`, so narflow can stand in for `nix copy --to`.
//!
//! Parsing only: this module never touches the file system or the network.
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
    "parallel-compression",
    "priority",
    "want-mass-query",
    "write-nar-listing",
    "region",
    "endpoint",
    "profile",
    "scheme",
    "addressing-style",
    "storage-class",
    "multipart-upload",
    "buffer-size",
    // narflow's own tuning for S3:
    "concurrency",
    "retries",
    "read-timeout",
];

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
            if !KNOWN_PARAMS.contains(&k.as_str()) {
                return Err(err(format!("unknown parameter {k:?}")));
            }
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
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
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
        ] {
            let e = CacheUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(url) && e.contains(reason), "{url}: {e}");
        }
    }
}
