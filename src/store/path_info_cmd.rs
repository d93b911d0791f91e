//! Fallback path info from `nix path-info --json` (Nix 2.8's JSON: an array of objects with
//! path, narHash, narSize, references, deriver, signatures, ca, valid).
//!
//! Owns running the `nix` command. It must never make Nix build or download anything:
//! `--offline` stops Nix from asking substituters for paths that are not valid, and `.drv`
//! paths are queried with `--derivation`, because Nix 2.8 takes a `.drv` argument to mean
//! its outputs, and would build them and describe those instead.
use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::{PathInfo, StoreError};
use crate::format::hash::Sha256;
use crate::format::store_path::StorePath;

/// Paths per `nix path-info` call: keeps the argument list far below the kernel's limit
/// (1,000 × ~60 bytes) while spawning Nix rarely.
const CHUNK: usize = 1000;

/// Path info from the `nix` command on `PATH`.
#[derive(Debug)]
pub struct PathInfoCommand {
    store_dir: String,
}

/// One element of `nix path-info --json`'s array. Other keys (registrationTime, ultimate)
/// are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonPathInfo {
    path: String,
    /// Present (and false) only for paths that are not valid.
    #[serde(default = "valid_by_default")]
    valid: bool,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
    #[serde(default)]
    signatures: Vec<String>,
    ca: Option<String>,
}

fn valid_by_default() -> bool {
    true
}

impl PathInfoCommand {
    /// Queries the store at `store_dir` through `nix path-info`. Runs nothing yet.
    pub fn new(store_dir: &str) -> Self {
        Self {
            store_dir: store_dir.to_owned(),
        }
    }

    /// The store directory paths are in.
    pub fn store_dir(&self) -> &str {
        &self.store_dir
    }

    /// See [`super::LocalStore::derivation_outputs`]: `nix-store --query --outputs`.
    ///
    /// # Errors
    /// [`StoreError::Command`] with Nix's stderr when it fails.
    pub fn derivation_outputs(&self, drv: &StorePath) -> Result<Vec<StorePath>, StoreError> {
        let full = drv.to_absolute(&self.store_dir);
        let out = std::process::Command::new("nix-store")
            .args(["--query", "--outputs"])
            .arg(&full)
            .output()
            .map_err(|e| StoreError::Command(format!("cannot run nix-store: {e}")))?;
        if !out.status.success() {
            return Err(StoreError::Command(format!(
                "nix-store --query --outputs {full}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                StorePath::from_absolute_path(l.trim(), &self.store_dir)
                    .map_err(|e| StoreError::Command(e.to_string()))
            })
            .collect()
    }

    /// See [`super::LocalStore::path_infos`]. One `nix path-info` per 1,000 paths.
    ///
    /// # Errors
    /// [`StoreError::NotValid`] for a path that is not valid (the first in input order among
    /// those Nix reported); [`StoreError::Command`] with Nix's stderr when `nix` cannot run
    /// or fails; [`StoreError::Corrupt`] naming the path and field when its JSON is not what
    /// Nix 2.8 prints.
    pub fn path_infos(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, StoreError> {
        let mut found: HashMap<StorePath, PathInfo> = HashMap::with_capacity(paths.len());
        let mut invalid: HashSet<StorePath> = HashSet::new();
        let (drvs, others): (Vec<&StorePath>, Vec<&StorePath>) =
            paths.iter().partition(|p| p.name().ends_with(".drv"));
        'groups: for (group, derivation) in [(others, false), (drvs, true)] {
            for chunk in group.chunks(CHUNK) {
                match self.query(chunk, derivation, &mut found, &mut invalid) {
                    Ok(()) => {}
                    // Nix stops at the first invalid `.drv`; the other paths are not needed.
                    Err(StoreError::NotValid(p)) => {
                        let p = StorePath::from_absolute_path(&p, &self.store_dir)
                            .map_err(|e| StoreError::Command(e.to_string()))?;
                        invalid.insert(p);
                        break 'groups;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(p) = paths.iter().find(|p| invalid.contains(*p)) {
            return Err(StoreError::NotValid(p.to_absolute(&self.store_dir)));
        }
        paths
            .iter()
            .map(|p| {
                found.get(p).cloned().ok_or_else(|| {
                    StoreError::Command(format!(
                        "printed nothing about {}",
                        p.to_absolute(&self.store_dir)
                    ))
                })
            })
            .collect()
    }

    /// Runs `nix path-info` on one chunk, adding what it reports to `found` or `invalid`.
    fn query(
        &self,
        chunk: &[&StorePath],
        derivation: bool,
        found: &mut HashMap<StorePath, PathInfo>,
        invalid: &mut HashSet<StorePath>,
    ) -> Result<(), StoreError> {
        let mut cmd = Command::new("nix");
        cmd.args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "--offline",
        ]);
        if derivation {
            cmd.arg("--derivation");
        }
        cmd.args(chunk.iter().map(|p| p.to_absolute(&self.store_dir)))
            .stdin(Stdio::null());
        let out = cmd
            .output()
            .map_err(|e| StoreError::Command(format!("cannot run `nix`: {e}")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            if let Some(p) = invalid_path_in(&stderr) {
                return Err(StoreError::NotValid(p.to_owned()));
            }
            return Err(StoreError::Command(format!(
                "{}: {}",
                out.status,
                stderr.trim()
            )));
        }
        self.parse_output(&out.stdout, found, invalid)
    }

    /// Parses `nix path-info --json`'s output into `found` or `invalid`.
    fn parse_output(
        &self,
        stdout: &[u8],
        found: &mut HashMap<StorePath, PathInfo>,
        invalid: &mut HashSet<StorePath>,
    ) -> Result<(), StoreError> {
        let json: Vec<JsonPathInfo> = serde_json::from_slice(stdout)
            .map_err(|e| StoreError::Command(format!("cannot parse its JSON output: {e}")))?;
        for j in json {
            let path = StorePath::from_absolute_path(&j.path, &self.store_dir)
                .map_err(|e| corrupt(&j.path, "path", e.to_string()))?;
            if j.valid {
                let info = self.to_path_info(path.clone(), j)?;
                found.insert(path, info);
            } else {
                invalid.insert(path);
            }
        }
        Ok(())
    }

    fn to_path_info(&self, path: StorePath, j: JsonPathInfo) -> Result<PathInfo, StoreError> {
        let parse_path =
            |s: &str| StorePath::from_absolute_path(s, &self.store_dir).map_err(|e| e.to_string());
        let nar_hash = j
            .nar_hash
            .ok_or_else(|| "missing".to_owned())
            .and_then(|h| Sha256::parse(&h).map_err(|e| e.to_string()))
            .map_err(|reason| corrupt(&j.path, "narHash", reason))?;
        let nar_size = j
            .nar_size
            .ok_or_else(|| corrupt(&j.path, "narSize", "missing".to_owned()))?;
        let mut references = j
            .references
            .iter()
            .map(|r| parse_path(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|reason| corrupt(&j.path, "references", reason))?;
        references.sort_unstable();
        let deriver = match j.deriver.as_deref() {
            None | Some("") => None,
            Some(d) => Some(parse_path(d).map_err(|reason| corrupt(&j.path, "deriver", reason))?),
        };
        let sigs = super::db::parse_sigs(&j.path, j.signatures.iter().map(String::as_str));
        Ok(PathInfo {
            path,
            nar_hash,
            nar_size,
            references,
            deriver,
            sigs,
            ca: j.ca.filter(|c| !c.is_empty()),
        })
    }
}

/// The path in Nix's "path '<p>' is not a valid store path" (what `--derivation` prints
/// for a `.drv` that is not valid).
fn invalid_path_in(stderr: &str) -> Option<&str> {
    let (before, _) = stderr.split_once("' is not a valid store path")?;
    let (_, path) = before.rsplit_once("path '")?;
    Some(path)
}

fn corrupt(path: &str, field: &'static str, reason: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        field,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nix 2.8's `nix path-info --json --offline` output for a path that is not valid, a
    /// built output with a deriver and two signatures, and a `.drv` (content-addressed),
    /// with references added to the output to cover sorting and self-references.
    const NIX_2_8: &str = r#"[{"path":"/nix/store/00000000000000000000000000000000-nope","valid":false},{"path":"/nix/store/9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep","narHash":"sha256-uIpgMFz+LpQorXXGBtD794K8sB9MXrHnPr9GgYGbffU=","narSize":128,"references":["/nix/store/qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-hi.txt","/nix/store/9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep"],"deriver":"/nix/store/27azdxqzvk6kp3v7paqal5y4w5rbcqcb-nfx-dep.drv","registrationTime":1795645339,"ultimate":true,"signatures":["exp-1:94rROnOPCqq2vDnjrLvWRNL/57w3rvHVPrR0LfL4pF6V5V/n9IHAnHkuFiENZMH9iJUtsmnAG4E7dcL6e35BDQ==","exp-2:jozXaIsBy+4Dn9rnP9/RwXGy9i0L13E398FMcxtMyAn6kPmxLSQvN9nXCQ4JJNk/a/onwDKPmPovLMDlesSZDA=="]},{"path":"/nix/store/mclgkg09ls67lzyidmax66nyy9sc0hh7-nfx-top.drv","narHash":"sha256-4+gjAr1iByaZUehPw84seTmfpUTEeqyTnaQas1VXi0U=","narSize":496,"references":["/nix/store/27azdxqzvk6kp3v7paqal5y4w5rbcqcb-nfx-dep.drv"],"ca":"text:sha256:0qr9q898xi83d20bjls0m9508g9d9x65bxjaxdywxjkbwqp3dq5h","registrationTime":1795645334}]"#;

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }

    fn parse(json: &str) -> Result<(HashMap<StorePath, PathInfo>, HashSet<StorePath>), StoreError> {
        let (mut found, mut invalid) = (HashMap::new(), HashSet::new());
        PathInfoCommand::new("/nix/store").parse_output(
            json.as_bytes(),
            &mut found,
            &mut invalid,
        )?;
        Ok((found, invalid))
    }

    /// Needs `Signature::parse` (src/format/signing.rs).
    #[test]
    fn parses_nix_2_8_json() {
        let (found, invalid) = parse(NIX_2_8).unwrap();
        assert_eq!(
            invalid,
            HashSet::from([sp("00000000000000000000000000000000-nope")])
        );
        let dep = &found[&sp("9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep")];
        assert_eq!(
            dep.nar_hash.to_sri(),
            "sha256-uIpgMFz+LpQorXXGBtD794K8sB9MXrHnPr9GgYGbffU="
        );
        assert_eq!(dep.nar_size, 128);
        // Sorted, as from the database.
        assert_eq!(
            dep.references,
            [
                sp("9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep"),
                sp("qs2vcw1sd6lzsvgvq6gggnw1v31qrm28-hi.txt")
            ]
        );
        assert_eq!(
            dep.deriver,
            Some(sp("27azdxqzvk6kp3v7paqal5y4w5rbcqcb-nfx-dep.drv"))
        );
        assert_eq!(dep.ca, None);
        let keys: Vec<&str> = dep.sigs.iter().map(|s| s.key_name.as_str()).collect();
        assert_eq!(keys, ["exp-1", "exp-2"]);
        let drv = &found[&sp("mclgkg09ls67lzyidmax66nyy9sc0hh7-nfx-top.drv")];
        assert_eq!(
            (drv.deriver.as_ref(), drv.sigs.len(), drv.ca.as_deref()),
            (
                None,
                0,
                Some("text:sha256:0qr9q898xi83d20bjls0m9508g9d9x65bxjaxdywxjkbwqp3dq5h")
            )
        );
    }

    #[test]
    fn bad_json_is_corrupt_naming_path_and_field() {
        let p = "/nix/store/9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep";
        let cases = [
            (format!(r#"[{{"path":"{p}","narSize":1}}]"#), "narHash"),
            (
                format!(r#"[{{"path":"{p}","narHash":"sha256-x","narSize":1}}]"#),
                "narHash",
            ),
            (
                format!(
                    r#"[{{"path":"{p}","narHash":"sha256-uIpgMFz+LpQorXXGBtD794K8sB9MXrHnPr9GgYGbffU="}}]"#
                ),
                "narSize",
            ),
            (
                format!(
                    r#"[{{"path":"{p}","narHash":"sha256-uIpgMFz+LpQorXXGBtD794K8sB9MXrHnPr9GgYGbffU=","narSize":1,"references":["/tmp/x"]}}]"#
                ),
                "references",
            ),
            (
                format!(
                    r#"[{{"path":"{p}","narHash":"sha256-uIpgMFz+LpQorXXGBtD794K8sB9MXrHnPr9GgYGbffU=","narSize":1,"deriver":"x.drv"}}]"#
                ),
                "deriver",
            ),
            (r#"[{"path":"/nix/store/short"}]"#.to_owned(), "path"),
        ];
        for (json, field) in cases {
            match parse(&json) {
                Err(StoreError::Corrupt { path, field: f, .. }) => {
                    assert_eq!(f, field, "{json}");
                    assert!(path.starts_with("/nix/store/"), "{json}");
                }
                r => panic!("{json}: {r:?}"),
            }
        }
        assert!(matches!(parse("not json"), Err(StoreError::Command(_))));
    }

    #[test]
    fn finds_the_invalid_path_in_nix_errors() {
        let stderr = "warning: something\nerror: path '/nix/store/00000000000000000000000000000000-nope.drv' is not a valid store path\n";
        assert_eq!(
            invalid_path_in(stderr),
            Some("/nix/store/00000000000000000000000000000000-nope.drv")
        );
        assert_eq!(invalid_path_in("error: something else"), None);
    }
}
