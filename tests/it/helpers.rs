//! Shared helpers: run real Nix, make store paths, run the narflow binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `cmd`, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run scripts/setup-nix)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stdout of a successful command, trimmed.
pub fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout)
        .expect("utf-8 stdout")
        .trim()
        .to_owned()
}

/// `nix-store --add PATH`: adds a file or tree to the real store, returns the store path.
pub fn nix_store_add(path: &Path) -> String {
    stdout(Command::new("nix-store").arg("--add").arg(path))
}

/// `nix-store --dump PATH`: the NAR that real Nix makes of a path.
pub fn nix_store_dump(path: &Path) -> Vec<u8> {
    run(Command::new("nix-store").arg("--dump").arg(path)).stdout
}

/// The narflow binary built for this test run, with its default state (push's upload
/// journal) in this test process's own directory under the target dir, never the user's.
pub fn narflow() -> Command {
    static STATE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let state = STATE.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the tests' state directory");
        dir
    });
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_narflow"));
    cmd.env("XDG_STATE_HOME", state);
    cmd
}

/// A fresh temporary directory, removed on drop.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("narflow-test-")
        .tempdir()
        .expect("tempdir")
}

/// A unique string for this process and call, so store paths made by different runs differ.
pub fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{tag}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn path_buf(s: &str) -> PathBuf {
    PathBuf::from(s)
}

/// A signing key pair made by real Nix: (secret key file, public key string).
pub struct NixKey {
    pub secret: PathBuf,
    pub public: String,
    _dir: tempfile::TempDir,
}

/// Makes a key pair with `nix-store --generate-binary-cache-key`; the secret file is
/// mode 0600, as narflow requires.
pub fn nix_generate_key(name: &str) -> NixKey {
    let dir = tempdir();
    let (secret, public) = (dir.path().join("secret"), dir.path().join("public"));
    run(Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&secret)
        .arg(&public));
    // Nix 2.8 creates a new secret file 0600 but keeps the mode of one that exists, so
    // the mode is set rather than assumed (as the README's set-up commands do).
    set_mode(&secret, 0o600);
    let public = std::fs::read_to_string(&public).unwrap().trim().to_owned();
    NixKey {
        secret,
        public,
        _dir: dir,
    }
}

/// Sets a file's permission bits.
pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Writes `expr` to a .nix file and builds it with real Nix; returns the output paths.
pub fn nix_build(expr: &str) -> Vec<String> {
    let dir = tempdir();
    let file = dir.path().join("default.nix");
    std::fs::write(&file, expr).unwrap();
    // No substituters: the machine is offline and Nix would retry cache.nixos.org each time.
    let mut cmd = Command::new("nix-build");
    cmd.arg(&file)
        .arg("--no-out-link")
        .args(["--option", "substituters", ""]);
    stdout(&mut cmd).lines().map(str::to_owned).collect()
}

/// A chain of `n` input-addressed derivations built by real Nix, each referencing the one
/// before it (and every third one the one two before, so the graph is not just a line).
/// Outputs alternate between a file and a directory holding an executable, a symlink to its
/// reference, and an empty file. Returns the last output (whose closure is all `n`).
pub fn nix_build_chain(tag: &str, n: usize) -> String {
    let u = unique(tag);
    let mut expr = String::from("let\n");
    for i in 0..n {
        let refs = match i {
            0 => String::new(),
            _ if i % 3 == 0 && i >= 2 => format!("${{d{}}} ${{d{}}}", i - 1, i - 2),
            _ => format!("${{d{}}}", i - 1),
        };
        let script = if i % 2 == 0 {
            format!("echo {u}-{i} {refs} > $out")
        } else {
            format!(
                "/bin/mkdir -p $out/bin $out/empty-dir && echo '#!/bin/sh' > $out/bin/run && /bin/chmod +x $out/bin/run && \
                 : > $out/empty && echo {u}-{i} {refs} > $out/refs{}",
                if i > 0 {
                    format!(" && /bin/ln -s ${{d{}}} $out/link", i - 1)
                } else {
                    String::new()
                }
            )
        };
        expr.push_str(&format!(
            "  d{i} = derivation {{ name = \"chain-{i}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"{}\" ]; }};\n",
            script.replace('"', "\\\"")
        ));
    }
    expr.push_str(&format!("in d{}\n", n - 1));
    let out = nix_build(&expr);
    assert_eq!(out.len(), 1, "{out:?}");
    out.into_iter().next().unwrap()
}

/// `nix-store -qR`: the closure real Nix computes.
pub fn nix_closure(path: &str) -> Vec<String> {
    stdout(Command::new("nix-store").arg("-qR").arg(path))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Substitutes `paths` from `cache_url` into a fresh chroot store under `root`, with
/// signatures required and only `trusted_key` trusted. Returns Nix's output on failure.
pub fn nix_substitute(
    root: &Path,
    cache_url: &str,
    trusted_key: &str,
    paths: &[String],
) -> Result<(), String> {
    let out = Command::new("nix-store")
        .arg("--store")
        .arg(format!("local?root={}", root.display()))
        .arg("--realise")
        .args(paths)
        .args(["--option", "substituters", cache_url])
        .args(["--option", "trusted-public-keys", trusted_key])
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .output()
        .expect("nix-store");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `nix path-info --json` of `paths` in a store (`None`: the system store), parsed.
pub fn nix_path_info(store: Option<&str>, paths: &[String]) -> serde_json::Value {
    let mut cmd = Command::new("nix");
    cmd.args(["path-info", "--json", "--offline"]);
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    serde_json::from_str(&stdout(cmd.args(paths))).expect("path-info JSON")
}

/// Asserts that real Nix substitutes `paths` from the cache at `cache_url` (signatures
/// required, only `key` trusted) into a fresh chroot store, and that what it gets has the
/// NarHash, NarSize and references of the local store.
pub fn assert_nix_substitutes(cache_url: &str, key: &NixKey, paths: &[String]) {
    let root = tempdir();
    if let Err(e) = nix_substitute(root.path(), cache_url, &key.public, paths) {
        panic!("Nix cannot substitute from {cache_url}:\n{e}");
    }
    let store = format!("local?root={}", root.path().display());
    let theirs = nix_path_info(Some(&store), paths);
    let ours = nix_path_info(None, paths);
    let (theirs, ours) = (theirs.as_array().unwrap(), ours.as_array().unwrap());
    assert_eq!(theirs.len(), ours.len());
    for (a, b) in theirs.iter().zip(ours) {
        assert_eq!(a["path"], b["path"]);
        assert_eq!(a["narHash"], b["narHash"], "{}", a["path"]);
        assert_eq!(a["narSize"], b["narSize"], "{}", a["path"]);
        assert_eq!(a["references"], b["references"], "{}", a["path"]);
    }
}

/// Writes `len` bytes of incompressible xorshift64 output, seeded from `seed`, to `path`.
pub fn write_random_file(path: &Path, len: u64, seed: &str) {
    use std::hash::{Hash, Hasher};
    use std::io::Write;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    let mut x = h.finish() | 1;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    out.flush().unwrap();
}

/// Adds a fresh file of `len` incompressible bytes to the store; the store path is
/// removed again (`nix-store --delete`) when the returned value is dropped.
pub struct BigPath {
    pub path: String,
}

impl BigPath {
    pub fn new(tag: &str, len: u64) -> BigPath {
        let dir = tempdir();
        let name = unique(tag);
        let file = dir.path().join(&name);
        write_random_file(&file, len, &name);
        BigPath {
            path: nix_store_add(&file),
        }
    }
}

impl Drop for BigPath {
    fn drop(&mut self) {
        // Best effort: it only saves disk space.
        let _ = Command::new("nix-store")
            .arg("--delete")
            .arg(&self.path)
            .output();
    }
}

/// The hash part of a full store path: the name of its narinfo without `.narinfo`.
pub fn hash_part(full_path: &str) -> &str {
    let base = full_path.rsplit('/').next().unwrap();
    &base[..32]
}

/// `<hash part>.narinfo`
pub fn narinfo_key(full_path: &str) -> String {
    format!("{}.narinfo", hash_part(full_path))
}

/// One `Key: value` field of a narinfo (the first, for repeated keys).
pub fn narinfo_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
}

/// The S3 server of the integration tests, from the environment `scripts/s3-server`
/// exports.
#[derive(Debug, Clone)]
pub struct S3Env {
    /// `garage`, `minio` or `moto` (empty when not exported).
    pub server: String,
    /// False when the server accepts any key (moto checks no signatures).
    pub checks_credentials: bool,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// The bucket over anonymous HTTP: what Nix substitutes from.
    pub http_url: String,
}

/// The S3 test server, or `None` (after saying so) when `NARFLOW_TEST_S3=0` skips the S3
/// tests. Panics when the environment lacks the server's exports.
pub fn s3_env() -> Option<S3Env> {
    if std::env::var("NARFLOW_TEST_S3").as_deref() == Ok("0") {
        let name = std::thread::current()
            .name()
            .unwrap_or("S3 test")
            .to_owned();
        println!("{name}: skipped (NARFLOW_TEST_S3=0)");
        return None;
    }
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: the S3 tests need a server; run via scripts/test, or \
                 eval \"$(scripts/s3-server start)\" (NARFLOW_TEST_S3=0 skips them)"
            )
        })
    };
    Some(S3Env {
        server: std::env::var("NARFLOW_TEST_S3_SERVER").unwrap_or_default(),
        checks_credentials: std::env::var("NARFLOW_TEST_S3_CHECKS_CREDENTIALS").as_deref()
            != Ok("0"),
        endpoint: var("NARFLOW_TEST_S3_ENDPOINT")
            .trim_end_matches('/')
            .to_owned(),
        region: var("NARFLOW_TEST_S3_REGION"),
        bucket: var("NARFLOW_TEST_S3_BUCKET"),
        access_key: var("AWS_ACCESS_KEY_ID"),
        secret_key: var("AWS_SECRET_ACCESS_KEY"),
        http_url: var("NARFLOW_TEST_S3_HTTP_URL")
            .trim_end_matches('/')
            .to_owned(),
    })
}

impl S3Env {
    /// narflow's URL for the test bucket; `extra` is appended to the query (`&retries=1`).
    pub fn url(&self, extra: &str) -> String {
        self.url_at(&self.endpoint, extra)
    }

    /// The test bucket reached through another endpoint (a proxy).
    pub fn url_at(&self, endpoint: &str, extra: &str) -> String {
        format!(
            "s3://{}?endpoint={endpoint}&region={}{extra}",
            self.bucket, self.region
        )
    }

    /// A client straight to the server, for looking at what narflow left there.
    pub fn client(&self) -> S3Client {
        S3Client::new(self, &self.endpoint)
    }
}

/// What a HEAD of an object says.
#[derive(Debug, Clone)]
pub struct ObjectHead {
    pub size: u64,
    pub etag: String,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub last_modified: Option<std::time::SystemTime>,
}

/// aws-sdk-s3 on a small runtime of its own, for the tests' own look at the bucket.
/// Usable from several threads at once.
pub struct S3Client {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Client {
    pub fn new(env: &S3Env, endpoint: &str) -> S3Client {
        use aws_sdk_s3::config;
        let conf = config::Builder::new()
            .behavior_version(config::BehaviorVersion::latest())
            .http_client(narflow::cache::s3::http_client())
            .region(config::Region::new(env.region.clone()))
            .endpoint_url(endpoint)
            .force_path_style(true)
            .credentials_provider(config::Credentials::new(
                &env.access_key,
                &env.secret_key,
                None,
                None,
                "narflow-tests",
            ))
            .request_checksum_calculation(config::RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(config::ResponseChecksumValidation::WhenRequired)
            .build();
        S3Client {
            rt: tokio::runtime::Runtime::new().expect("tokio runtime"),
            client: aws_sdk_s3::Client::from_conf(conf),
            bucket: env.bucket.clone(),
        }
    }

    /// HEAD of `key`; `None` when it does not exist.
    pub fn head(&self, key: &str) -> Option<ObjectHead> {
        let r = self.rt.block_on(
            self.client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send(),
        );
        match r {
            Ok(o) => Some(ObjectHead {
                size: o.content_length().unwrap_or_default() as u64,
                etag: o.e_tag().unwrap_or_default().to_owned(),
                content_type: o.content_type().map(str::to_owned),
                content_encoding: o.content_encoding().map(str::to_owned),
                last_modified: o
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
            }),
            Err(aws_sdk_s3::error::SdkError::ServiceError(e)) if e.err().is_not_found() => None,
            Err(e) => panic!("HEAD {key}: {}", aws_sdk_s3::error::DisplayErrorContext(&e)),
        }
    }

    pub fn exists(&self, key: &str) -> bool {
        self.head(key).is_some()
    }

    /// GET of `key`; `None` when it does not exist.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.rt.block_on(async {
            let r = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await;
            match r {
                Ok(o) => Some(o.body.collect().await.expect("GET body").to_vec()),
                Err(aws_sdk_s3::error::SdkError::ServiceError(e)) if e.err().is_no_such_key() => {
                    None
                }
                Err(e) => panic!("GET {key}: {}", aws_sdk_s3::error::DisplayErrorContext(&e)),
            }
        })
    }

    pub fn get_text(&self, key: &str) -> Option<String> {
        self.get(key)
            .map(|b| String::from_utf8(b).expect("UTF-8 object"))
    }

    /// Keys (with sizes) under `prefix`.
    pub fn list(&self, prefix: &str) -> Vec<(String, u64)> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut token = None;
            loop {
                let page = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .set_continuation_token(token)
                    .send()
                    .await
                    .unwrap_or_else(|e| {
                        panic!(
                            "list {prefix}: {}",
                            aws_sdk_s3::error::DisplayErrorContext(&e)
                        )
                    });
                out.extend(page.contents().iter().map(|o| {
                    (
                        o.key().unwrap_or_default().to_owned(),
                        o.size().unwrap_or_default() as u64,
                    )
                }));
                match page.next_continuation_token() {
                    Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                    _ => return out,
                }
            }
        })
    }

    /// Multipart uploads in progress under `prefix`: (key, upload id).
    pub fn multipart_uploads(&self, prefix: &str) -> Vec<(String, String)> {
        let r = self
            .rt
            .block_on(
                self.client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .send(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "ListMultipartUploads {prefix}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            });
        r.uploads()
            .iter()
            .map(|u| {
                (
                    u.key().unwrap_or_default().to_owned(),
                    u.upload_id().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Puts a small object (a planted leftover).
    pub fn put(&self, key: &str, body: &[u8]) {
        self.rt
            .block_on(
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .body(body.to_vec().into())
                    .send(),
            )
            .unwrap_or_else(|e| {
                panic!("PUT {key}: {}", aws_sdk_s3::error::DisplayErrorContext(&e))
            });
    }

    /// Starts a multipart upload and returns its id and Initiated time (a planted
    /// leftover).
    pub fn create_multipart(&self, key: &str) -> (String, Option<std::time::SystemTime>) {
        let id = self
            .rt
            .block_on(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .send(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "CreateMultipartUpload {key}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })
            .upload_id()
            .unwrap_or_default()
            .to_owned();
        let listed = self
            .rt
            .block_on(
                self.client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(key)
                    .send(),
            )
            .expect("ListMultipartUploads");
        let initiated = listed
            .uploads()
            .iter()
            .find(|u| u.upload_id() == Some(id.as_str()))
            .and_then(|u| u.initiated())
            .and_then(|t| std::time::SystemTime::try_from(*t).ok());
        (id, initiated)
    }

    /// Completes a multipart upload with `parts` (number and ETag each), as a run killed
    /// right after its Complete leaves it.
    pub fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[(i32, String)]) {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let parts = parts
            .iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(*n).e_tag(etag).build())
            .collect();
        self.rt
            .block_on(
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "CompleteMultipartUpload {key}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            });
    }

    /// Sends part `number` of the multipart upload `upload_id` on `key`; returns its ETag.
    pub fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: &[u8]) -> String {
        self.rt
            .block_on(
                self.client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .body(body.to_vec().into())
                    .send(),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "UploadPart {key}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })
            .e_tag()
            .unwrap_or_default()
            .to_owned()
    }

    /// Aborts a multipart upload (the tests' own leftovers only).
    pub fn abort_multipart(&self, key: &str, upload_id: &str) {
        let _ = self.rt.block_on(
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send(),
        );
    }

    /// Deletes an object (the tests' own large objects only, to spare the server's disk).
    pub fn delete(&self, key: &str) {
        let _ = self.rt.block_on(
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send(),
        );
    }
}

/// What `narflow push` opens a cache with at the default settings, for `url`.
pub fn open_options(url: &narflow::cache::url::CacheUrl) -> narflow::cache::OpenOptions {
    let opts = narflow::pipeline::PushOptions::new(
        narflow::format::compression::CompressionSettings::new(
            narflow::format::compression::Compression::Zstd,
            None,
        )
        .unwrap(),
        Vec::new(),
    );
    opts.cache_options(narflow::cache::S3Tuning::from_url(url).unwrap())
}
