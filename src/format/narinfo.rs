//! narinfo: the text file describing one store path in a binary cache.
//!
//! Rendered fields, in Nix's order, one `Key: value\n` per line: StorePath, URL,
//! Compression, FileHash, FileSize, NarHash, NarSize, References (basenames, sorted,
//! space-separated; `References: ` with a trailing space when empty), Deriver (basename,
//! only when known), Sig (repeatable), CA (only when set). Unknown keys are ignored on parse.
//!
//! This module owns the text form only: it never fetches, uploads or checks a NAR against
//! its hash. Rendering what it parsed from a narinfo Nix 2.8 wrote gives back the same
//! bytes (tested against real Nix in `tests/it/narinfo_nix.rs`).
use crate::format::hash::Sha256;
use crate::format::signing::{Signature, SigningKey, VerifyingKey};
use crate::format::store_path::StorePath;
use std::fmt::Write as _;

/// A narinfo that cannot be parsed. Bad input: retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    /// Line `line` (1-based) is wrong; `reason` starts with the field name.
    #[error("narinfo line {line}: {reason}")]
    Line { line: usize, reason: String },
    /// A required field (StorePath, URL, NarHash, NarSize) is absent.
    #[error("narinfo: missing required field {0}")]
    Missing(&'static str),
}

/// What Nix assumes when a narinfo has no Compression line (narinfos from before the field
/// existed were all bzip2).
pub const DEFAULT_COMPRESSION: &str = "bzip2";

/// The Deriver value some writers use for "not known"; parsed as no deriver.
const UNKNOWN_DERIVER: &str = "unknown-deriver";

/// One store path's entry in a binary cache.
///
/// A *valid* value, one that `parse(render(x)) == x` holds for, has sorted, unique
/// `references`, a non-empty `url` and `compression`, `nar_size > 0`, `ca` either `None` or
/// non-empty, and no newline in any text field: everything [`NarInfo::parse`] produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    /// Relative to the cache root, e.g. `nar/<FileHash nix32>.nar.zst`.
    pub url: String,
    /// `zstd`, `xz`, `none`, ... as Nix names it.
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Sorted (the set order of [`StorePath`]).
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    /// In file order. Nix keeps them as a set, so it writes them sorted by their text;
    /// [`NarInfo::sign`] keeps that order.
    pub sigs: Vec<Signature>,
    /// Nix's content-address text, e.g. `fixed:r:sha256:<nix32>`, kept verbatim.
    pub ca: Option<String>,
}

/// The fields that may appear at most once, in Nix's order. `Sig` is the one repeatable
/// field.
const SINGLE_FIELDS: [&str; 10] = [
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "CA",
];

impl NarInfo {
    /// Parses narinfo text. `store_dir` is the cache's StoreDir; StorePath must lie
    /// directly inside it.
    ///
    /// Lenient where Nix is: unknown keys (e.g. the obsolete `System`) are ignored, blank
    /// lines and a missing final newline are accepted, References may be separated by any
    /// whitespace (duplicates are dropped, the result is sorted), `Deriver: unknown-deriver`
    /// means no deriver, an absent or empty Compression means [`DEFAULT_COMPRESSION`], an
    /// empty CA means none, and hashes may be in any form [`Sha256::parse`] accepts.
    ///
    /// Strict where Nix would misread: every line must be `Key: value` (or `Key:` with an
    /// empty value), a field other than Sig may not appear twice, URL may not be empty and
    /// NarSize may not be 0 (Nix refuses both as corrupt).
    ///
    /// # Errors
    /// [`NarInfoError::Line`] naming the line and field, or [`NarInfoError::Missing`] for
    /// an absent StorePath, URL, NarHash or NarSize.
    pub fn parse(text: &str, store_dir: &str) -> Result<Self, NarInfoError> {
        let mut first_seen = [0usize; SINGLE_FIELDS.len()];
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = Vec::new();
        let mut deriver = None;
        let mut sigs = Vec::new();
        let mut ca = None;

        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            if line.is_empty() {
                continue;
            }
            let err = |reason: String| NarInfoError::Line {
                line: line_no,
                reason,
            };
            let (key, value) = split_line(line).map_err(err)?;
            if let Some(i) = SINGLE_FIELDS.iter().position(|&f| f == key) {
                if first_seen[i] != 0 {
                    return Err(err(format!(
                        "{key} appears again (first on line {})",
                        first_seen[i]
                    )));
                }
                first_seen[i] = line_no;
            }
            let field = |what: String| err(format!("{key}: {what}"));
            match key {
                "StorePath" => {
                    store_path = Some(
                        StorePath::from_absolute_path(value, store_dir)
                            .map_err(|e| field(e.to_string()))?,
                    );
                }
                "URL" => {
                    if value.is_empty() {
                        return Err(field("empty".into()));
                    }
                    url = Some(value.to_owned());
                }
                "Compression" => compression = Some(value.to_owned()),
                "FileHash" => {
                    file_hash = Some(Sha256::parse(value).map_err(|e| field(e.to_string()))?);
                }
                "FileSize" => file_size = Some(parse_u64(value).map_err(field)?),
                "NarHash" => {
                    nar_hash = Some(Sha256::parse(value).map_err(|e| field(e.to_string()))?);
                }
                "NarSize" => {
                    let n = parse_u64(value).map_err(field)?;
                    if n == 0 {
                        return Err(field("0, but a NAR is never empty".into()));
                    }
                    nar_size = Some(n);
                }
                "References" => {
                    for (i, r) in value.split_ascii_whitespace().enumerate() {
                        let r = StorePath::from_base_name(r)
                            .map_err(|e| field(format!("entry {}: {e}", i + 1)))?;
                        references.push(r);
                    }
                }
                "Deriver" if value == UNKNOWN_DERIVER => {}
                "Deriver" => {
                    deriver =
                        Some(StorePath::from_base_name(value).map_err(|e| field(e.to_string()))?);
                }
                "Sig" => sigs.push(Signature::parse(value).map_err(|e| field(e.to_string()))?),
                "CA" if value.is_empty() => {}
                "CA" => ca = Some(value.to_owned()),
                _ => {}
            }
        }

        references.sort_unstable();
        references.dedup();
        let compression = match compression {
            Some(c) if !c.is_empty() => c,
            _ => DEFAULT_COMPRESSION.to_owned(),
        };
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url: url.ok_or(NarInfoError::Missing("URL"))?,
            compression,
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references,
            deriver,
            sigs,
            ca,
        })
    }

    /// Renders in Nix's exact field order (see the module docs). FileHash and FileSize
    /// are written when set (narflow always sets them; Nix always writes them).
    ///
    /// References are written sorted and unique whatever the order of
    /// [`Self::references`], so the text always matches [`Self::fingerprint`]. Sig lines
    /// keep the order of [`Self::sigs`]; an empty `ca` is not written (it means none, as in
    /// Nix).
    pub fn render(&self, store_dir: &str) -> String {
        debug_assert!(
            !self.url.is_empty() && !self.compression.is_empty(),
            "narinfo for {}: URL and Compression must not be empty",
            self.store_path
        );
        debug_assert!(
            [&self.url, &self.compression]
                .into_iter()
                .chain(&self.ca)
                .all(|v| !v.contains(['\n', '\r'])),
            "narinfo for {}: a field contains a line break",
            self.store_path
        );
        let mut out = String::with_capacity(512 + 40 * self.references.len());
        // Writing to a String cannot fail.
        let _ = writeln!(out, "StorePath: {}", self.store_path.to_absolute(store_dir));
        let _ = writeln!(out, "URL: {}", self.url);
        let _ = writeln!(out, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(out, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(out, "FileSize: {n}");
        }
        let _ = writeln!(out, "NarHash: {}", self.nar_hash);
        let _ = writeln!(out, "NarSize: {}", self.nar_size);
        out.push_str("References: ");
        let mut refs: Vec<&StorePath> = self.references.iter().collect();
        refs.sort_unstable();
        refs.dedup();
        for (i, r) in refs.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(r.base_name());
        }
        out.push('\n');
        if let Some(d) = &self.deriver {
            let _ = writeln!(out, "Deriver: {d}");
        }
        for sig in &self.sigs {
            let _ = writeln!(out, "Sig: {sig}");
        }
        if let Some(ca) = self.ca.as_deref().filter(|c| !c.is_empty()) {
            let _ = writeln!(out, "CA: {ca}");
        }
        out
    }

    /// The fingerprint that signatures cover.
    pub fn fingerprint(&self, store_dir: &str) -> String {
        crate::format::signing::fingerprint(
            store_dir,
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// Adds `key`'s signature over [`Self::fingerprint`], keeping the signatures already
    /// there (e.g. the ones the local store holds). Like Nix, keeps [`Self::sigs`] unique
    /// and sorted by their text, so signing twice with one key adds nothing.
    pub fn sign(&mut self, key: &SigningKey, store_dir: &str) {
        let sig = key.sign(&self.fingerprint(store_dir));
        if !self.sigs.contains(&sig) {
            self.sigs.push(sig);
        }
        self.sigs.sort_by_cached_key(Signature::to_string);
        self.sigs.dedup();
    }

    /// How many distinct signatures in [`Self::sigs`] one of `keys` verifies, Nix's
    /// count for `--sigs-needed` / `require-sigs`.
    pub fn valid_signatures(&self, store_dir: &str, keys: &[VerifyingKey]) -> usize {
        let fp = self.fingerprint(store_dir);
        let mut good: Vec<&Signature> = self
            .sigs
            .iter()
            .filter(|s| keys.iter().any(|k| k.verify(&fp, s)))
            .collect();
        good.sort_unstable_by(|a, b| (&a.key_name, a.bytes).cmp(&(&b.key_name, b.bytes)));
        good.dedup();
        good.len()
    }
}

/// Splits `Key: value`; `Key:` alone is an empty value.
fn split_line(line: &str) -> Result<(&str, &str), String> {
    let Some((key, rest)) = line.split_once(':') else {
        return Err(format!("expected `Key: value`, got {line:?}"));
    };
    if key.is_empty() {
        return Err(format!("empty key in {line:?}"));
    }
    // `lines()` strips one trailing CR; any other control character (a CR or NUL inside a
    // value) is not something Nix writes, and could not be rendered back as one line.
    if let Some(c) = line.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(format!("{key}: control character {c:?} in {line:?}"));
    }
    if rest.is_empty() {
        return Ok((key, rest));
    }
    rest.strip_prefix(' ')
        .map(|value| (key, value))
        .ok_or_else(|| format!("{key}: expected a space after `{key}:`"))
}

/// A decimal `u64` with no sign, as Nix writes sizes.
fn parse_u64(value: &str) -> Result<u64, String> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{value:?} is not a decimal number"));
    }
    value
        .parse()
        .map_err(|_| format!("{value:?} is larger than 2^64 - 1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STORE: &str = "/nix/store";

    // Written by Nix 2.8's `nix copy --to file://…` after `nix store sign` with exp-1:
    // a built path with one reference and a deriver, its dependency with no references,
    // and a `nix-store --add` path (content-addressed, no deriver, two signatures,
    // compression=none).
    const NIX_TOP: &str = "\
StorePath: /nix/store/nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top
URL: nar/07gvk0dwh3dmkffn9p8axab6yj4px3x89872aim4w0d5skc7s106.nar.xz
Compression: xz
FileHash: sha256:07gvk0dwh3dmkffn9p8axab6yj4px3x89872aim4w0d5skc7s106
FileSize: 176
NarHash: sha256:0jf45dphcrr30yq5sva8gdakxa9cyclhshqjm3p79k236p4ianif
NarSize: 168
References: 9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep
Deriver: mclgkg09ls67lzyidmax66nyy9sc0hh7-nfx-top.drv
Sig: exp-1:0UncwSqRiGw1lPJJmWB5QSrxeeevmGGB+qBCKN3sr0jDmszTs6qhalOAVpId2PVczvR2XLPLgknBmPGosC4ODQ==
";
    const NIX_DEP: &str = "\
StorePath: /nix/store/9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep
URL: nar/0v9psw48nlzwinkfxzx5ndylxv5rs0ayy63m48cs7jcsi78axjbx.nar.xz
Compression: xz
FileHash: sha256:0v9psw48nlzwinkfxzx5ndylxv5rs0ayy63m48cs7jcsi78axjbx
FileSize: 136
NarHash: sha256:1xbxkf0q2imz7vkv2pjc3yqbr0ppzg80dikmmll98bpybhq612mq
NarSize: 128
References: 
Deriver: 27azdxqzvk6kp3v7paqal5y4w5rbcqcb-nfx-dep.drv
Sig: exp-1:94rROnOPCqq2vDnjrLvWRNL/57w3rvHVPrR0LfL4pF6V5V/n9IHAnHkuFiENZMH9iJUtsmnAG4E7dcL6e35BDQ==
";
    const NIX_CA: &str = "\
StorePath: /nix/store/x0qmxqqx5q60pvvsm8sprx6nky2b07cy-h.txt
URL: nar/1fhx2hp4kxizgiqp41xqa5szajyn7a997g85ck3n2p0bbdsja897.nar
Compression: none
FileHash: sha256:1fhx2hp4kxizgiqp41xqa5szajyn7a997g85ck3n2p0bbdsja897
FileSize: 128
NarHash: sha256:1fhx2hp4kxizgiqp41xqa5szajyn7a997g85ck3n2p0bbdsja897
NarSize: 128
References: 
Sig: exp-1:Ju+WAloVLMqpoSRsRKeEWCxf5rESvAcjI04kyN0Z+vCxRyDQtPTmgIjy3Lnv61K2+EXNJH5nZYkD2pz1JW9kCw==
Sig: exp-2:jozXaIsBy+4Dn9rnP9/RwXGy9i0L13E398FMcxtMyAn6kPmxLSQvN9nXCQ4JJNk/a/onwDKPmPovLMDlesSZDA==
CA: fixed:r:sha256:1fhx2hp4kxizgiqp41xqa5szajyn7a997g85ck3n2p0bbdsja897
";
    const PUB1: &str = "exp-1:zJOixFKrqqRzXlw/bLiCKhJ8EDWAa4o/JDtetbCQLYk=";
    const PUB2: &str = "exp-2:vf+diPDfEV619BFwV7Z02pt0YMFC4DEXBAoOwWW/YpU=";

    fn sp(base: &str) -> StorePath {
        StorePath::from_base_name(base).unwrap()
    }
    fn keys() -> Vec<VerifyingKey> {
        vec![
            VerifyingKey::parse(PUB1).unwrap(),
            VerifyingKey::parse(PUB2).unwrap(),
        ]
    }

    #[test]
    fn nix_narinfos_parse_render_and_verify() {
        for (text, sigs) in [(NIX_TOP, 1), (NIX_DEP, 1), (NIX_CA, 2)] {
            let info = NarInfo::parse(text, STORE).unwrap();
            assert_eq!(info.render(STORE), text);
            assert_eq!(info.valid_signatures(STORE, &keys()), sigs, "{text}");
        }
        let top = NarInfo::parse(NIX_TOP, STORE).unwrap();
        assert_eq!(
            top,
            NarInfo {
                store_path: sp("nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top"),
                url: "nar/07gvk0dwh3dmkffn9p8axab6yj4px3x89872aim4w0d5skc7s106.nar.xz".into(),
                compression: "xz".into(),
                file_hash: Some(
                    Sha256::parse("sha256:07gvk0dwh3dmkffn9p8axab6yj4px3x89872aim4w0d5skc7s106")
                        .unwrap()
                ),
                file_size: Some(176),
                nar_hash: Sha256::parse(
                    "sha256:0jf45dphcrr30yq5sva8gdakxa9cyclhshqjm3p79k236p4ianif"
                )
                .unwrap(),
                nar_size: 168,
                references: vec![sp("9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep")],
                deriver: Some(sp("mclgkg09ls67lzyidmax66nyy9sc0hh7-nfx-top.drv")),
                sigs: vec![Signature::parse("exp-1:0UncwSqRiGw1lPJJmWB5QSrxeeevmGGB+qBCKN3sr0jDmszTs6qhalOAVpId2PVczvR2XLPLgknBmPGosC4ODQ==").unwrap()],
                ca: None,
            }
        );
        let ca = NarInfo::parse(NIX_CA, STORE).unwrap();
        assert_eq!((ca.deriver, ca.references.len()), (None, 0));
        assert_eq!(
            ca.ca.as_deref(),
            Some("fixed:r:sha256:1fhx2hp4kxizgiqp41xqa5szajyn7a997g85ck3n2p0bbdsja897")
        );
    }

    #[test]
    fn our_signature_equals_nixs() {
        // ed25519 is deterministic, so signing with Nix's key reproduces Nix's Sig line.
        let sk = SigningKey::parse("exp-1:IZLB2s9QKUFleB8TiLmsyuq/l5LLVUoG41OXdgN9NFbMk6LEUquqpHNeXD9suIIqEnwQNYBrij8kO161sJAtiQ==").unwrap();
        let mut info = NarInfo::parse(NIX_TOP, STORE).unwrap();
        let nix_sig = info.sigs.clone();
        info.sigs.clear();
        info.sign(&sk, STORE);
        assert_eq!(info.sigs, nix_sig);
        info.sign(&sk, STORE);
        assert_eq!(info.sigs, nix_sig, "signing twice adds nothing");
        assert_eq!(info.render(STORE), NIX_TOP);
    }

    #[test]
    fn sign_keeps_existing_signatures_sorted() {
        let mut info = NarInfo::parse(NIX_TOP, STORE).unwrap();
        let a = SigningKey::from_seed("a-cache", [1; 32]);
        let z = SigningKey::from_seed("z-cache", [2; 32]);
        info.sign(&z, STORE);
        info.sign(&a, STORE);
        let names: Vec<_> = info.sigs.iter().map(|s| s.key_name.as_str()).collect();
        assert_eq!(names, ["a-cache", "exp-1", "z-cache"]);
        let mut ks = keys();
        ks.push(a.verifying_key());
        assert_eq!(info.valid_signatures(STORE, &ks), 2);
        ks.push(z.verifying_key());
        assert_eq!(info.valid_signatures(STORE, &ks), 3);
        // A duplicated Sig line counts once, as in Nix.
        info.sigs.push(info.sigs[0].clone());
        assert_eq!(info.valid_signatures(STORE, &ks), 3);
    }

    #[test]
    fn lenient_forms() {
        // Unknown keys, `unknown-deriver`, no Compression, base16/SRI hashes, extra
        // whitespace and unsorted duplicate references, no final newline, CRLF.
        let text = "StorePath: /nix/store/nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top\r\n\
            URL: nar/x.nar.bz2\n\
            System: x86_64-linux\n\
            NarHash: sha256:10551daed7fa467d0b58826e7eb9a0f2af7d693de319f2ef775fffcda244b9f6\n\
            FileHash: sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=\n\
            NarSize: 168\n\
            \n\
            References: nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top  9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep 9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep\n\
            Deriver: unknown-deriver\n\
            CA:";
        let info = NarInfo::parse(text, STORE).unwrap();
        assert_eq!(info.compression, "bzip2");
        assert_eq!(info.deriver, None);
        assert_eq!(info.ca, None);
        assert_eq!(info.file_hash, Some(info.nar_hash));
        assert_eq!(
            info.references,
            [
                sp("9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep"),
                sp("nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top")
            ]
        );
        let h = info.nar_hash.to_nix32();
        assert_eq!(
            info.render(STORE),
            format!(
                "StorePath: /nix/store/nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top\n\
                 URL: nar/x.nar.bz2\n\
                 Compression: bzip2\n\
                 FileHash: sha256:{h}\n\
                 NarHash: sha256:{h}\n\
                 NarSize: 168\n\
                 References: 9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep \
                 nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top\n"
            )
        );
    }

    #[test]
    fn render_sorts_references_defensively() {
        let mut info = NarInfo::parse(NIX_TOP, STORE).unwrap();
        let z = sp("zzfkprp7xigl4ny63bvmiva5p5sk290q-z");
        info.references.insert(0, z.clone());
        let text = info.render(STORE);
        assert!(text.contains(
            "\nReferences: 9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep zzfkprp7xigl4ny63bvmiva5p5sk290q-z\n"
        ));
    }

    /// Parses `text` and returns the error message, asserting it names `needle`.
    fn error_naming(text: &str, needles: &[&str]) -> NarInfoError {
        let e = NarInfo::parse(text, STORE).unwrap_err();
        let msg = e.to_string();
        for n in needles {
            assert!(msg.contains(n), "{msg:?} should name {n:?}");
        }
        e
    }

    #[test]
    fn errors_name_line_and_field() {
        let replace = |line: usize, new: &str| -> String {
            NIX_TOP
                .lines()
                .enumerate()
                .map(|(i, l)| if i + 1 == line { new } else { l })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let cases: &[(usize, &str, &[&str])] = &[
            (
                1,
                "StorePath: /tmp/nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top",
                &["line 1", "StorePath", "not in the Nix store /nix/store"],
            ),
            (
                1,
                "StorePath: /nix/store/nv3v6fjvj5dhh814srann0mh8hw0g41v-nfx-top/bin",
                &["line 1", "StorePath", "inside a store path"],
            ),
            (2, "URL: ", &["line 2", "URL: empty"]),
            (4, "FileHash: md5:abc", &["line 4", "FileHash", "md5:abc"]),
            (5, "FileSize: -1", &["line 5", "FileSize", "\"-1\""]),
            (
                6,
                "NarHash: sha256:xyz",
                &["line 6", "NarHash", "3 characters"],
            ),
            (7, "NarSize: 0", &["line 7", "NarSize", "never empty"]),
            (
                7,
                "NarSize: 99999999999999999999",
                &["line 7", "NarSize", "larger than"],
            ),
            (
                8,
                "References: 9zfkprp7xigl4ny63bvmiva5p5sk290q-nfx-dep bad",
                &["line 8", "References: entry 2", "\"bad\""],
            ),
            (
                9,
                "Deriver: /nix/store/mclgkg09ls67lzyidmax66nyy9sc0hh7-nfx-top.drv",
                &["line 9", "Deriver", "/nix/store/mclgkg"],
            ),
            (10, "Sig: exp-1", &["line 10", "Sig", "no `:`"]),
            // Found by the fuzzer: a CR inside a value parsed, then could not be rendered.
            (
                2,
                "URL: nar/a\rb.nar.xz",
                &["line 2", "URL", "control character '\\r'"],
            ),
            (
                3,
                "Compression: x\0z",
                &["line 3", "Compression", "control character '\\0'"],
            ),
            (
                10,
                "Sig: exp-1:AAAA",
                &["line 10", "Sig", "3 bytes, not 64"],
            ),
            (3, "Compression", &["line 3", "expected `Key: value`"]),
            (3, "Compression:xz", &["line 3", "Compression", "space"]),
            (3, ": xz", &["line 3", "empty key"]),
            (
                3,
                "URL: nar/other",
                &["line 3", "URL appears again (first on line 2)"],
            ),
        ];
        for (line, new, needles) in cases {
            let e = error_naming(&replace(*line, new), needles);
            assert!(
                matches!(e, NarInfoError::Line { line: l, .. } if l == *line),
                "{e:?}"
            );
        }
        let twice_ca = format!("{NIX_CA}CA: fixed:sha256:x\n");
        error_naming(
            &twice_ca,
            &["line 12", "CA appears again (first on line 11)"],
        );
        let e = error_naming(&format!("{NIX_TOP}NarSize: 168\n"), &["line 11", "NarSize"]);
        assert!(matches!(e, NarInfoError::Line { line: 11, .. }));
        // Sig and unknown keys may repeat.
        let extra = format!(
            "{NIX_TOP}Sig: {}\nX: 1\nX: 2\n",
            &NIX_TOP[NIX_TOP.find("exp-1:").unwrap()..NIX_TOP.len() - 1]
        );
        assert_eq!(NarInfo::parse(&extra, STORE).unwrap().sigs.len(), 2);
    }

    #[test]
    fn missing_required_fields() {
        for (field, prefix) in [
            ("StorePath", "StorePath:"),
            ("URL", "URL:"),
            ("NarHash", "NarHash:"),
            ("NarSize", "NarSize:"),
        ] {
            let text: String = NIX_TOP
                .lines()
                .filter(|l| !l.starts_with(prefix))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = NarInfo::parse(&text, STORE).unwrap_err();
            assert_eq!(e, NarInfoError::Missing(field));
            assert_eq!(
                e.to_string(),
                format!("narinfo: missing required field {field}")
            );
        }
        assert_eq!(
            NarInfo::parse("", STORE),
            Err(NarInfoError::Missing("StorePath"))
        );
    }

    #[test]
    fn other_store_dir() {
        let text = NIX_DEP.replace("/nix/store/", "/gnu/store/");
        let info = NarInfo::parse(&text, "/gnu/store").unwrap();
        assert_eq!(info.render("/gnu/store"), text);
        assert!(NarInfo::parse(&text, STORE).is_err());
        assert!(
            info.fingerprint("/gnu/store")
                .starts_with("1;/gnu/store/9zfk")
        );
    }

    fn store_path() -> impl Strategy<Value = StorePath> {
        (
            proptest::array::uniform20(any::<u8>()),
            "[A-Za-z0-9+._?=-]{1,60}",
        )
            .prop_filter("`.` and `..` are not names", |(_, n)| n != "." && n != "..")
            .prop_map(|(h, n)| {
                StorePath::from_base_name(&format!("{}-{n}", crate::format::nix32::encode(&h)))
                    .unwrap()
            })
    }

    fn sha256() -> impl Strategy<Value = Sha256> {
        proptest::array::uniform32(any::<u8>()).prop_map(Sha256)
    }

    fn signature() -> impl Strategy<Value = Signature> {
        (
            "[A-Za-z0-9._-]{1,20}",
            proptest::array::uniform::<_, 64>(any::<u8>()),
        )
            .prop_map(|(key_name, bytes)| Signature { key_name, bytes })
    }

    prop_compose! {
        fn narinfo()(
            store_path in store_path(),
            url in "[ -~]{1,80}",
            compression in prop_oneof!["xz", "zstd", "none", "bzip2", "[a-z0-9]{1,8}"],
            file_hash in proptest::option::of(sha256()),
            file_size in proptest::option::of(any::<u64>()),
            nar_hash in sha256(),
            nar_size in 1..=u64::MAX,
            mut references in proptest::collection::vec(store_path(), 0..6),
            deriver in proptest::option::of(store_path()),
            sigs in proptest::collection::vec(signature(), 0..3),
            ca in proptest::option::of("fixed:(r:)?sha256:[0-9a-z]{52}|text:sha256:[0-9a-z]{52}|[!-~][ -~]{0,40}"),
        ) -> NarInfo {
            references.sort_unstable();
            references.dedup();
            NarInfo {
                store_path, url, compression, file_hash, file_size, nar_hash, nar_size,
                references, deriver, sigs, ca,
            }
        }
    }

    proptest! {
        #[test]
        fn render_parse_render(info in narinfo()) {
            let text = info.render(STORE);
            let back = NarInfo::parse(&text, STORE).unwrap();
            prop_assert_eq!(&back, &info);
            prop_assert_eq!(back.render(STORE), text);
        }

        #[test]
        fn signed_narinfo_verifies(mut info in narinfo(), seed in proptest::array::uniform32(any::<u8>())) {
            let key = SigningKey::from_seed("prop-1", seed);
            let before = info.valid_signatures(STORE, &[key.verifying_key()]);
            prop_assert_eq!(before, 0);
            info.sign(&key, STORE);
            let back = NarInfo::parse(&info.render(STORE), STORE).unwrap();
            prop_assert_eq!(back.valid_signatures(STORE, &[key.verifying_key()]), 1);
        }

        #[test]
        fn parse_never_panics(text in "(([A-Za-z]{1,10}: )?[ -~]{0,60}\n){0,12}") {
            let _ = NarInfo::parse(&text, STORE);
        }
    }
}
