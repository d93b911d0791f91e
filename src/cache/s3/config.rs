//! Building the S3 client and its runtime from the cache URL and [`OpenOptions`].
use super::copy::COPY_LIMIT;
use super::memory::UploadMemory;
use super::upload::MIN_S3_PART;
use super::{S3Cache, Shared};
use crate::cache::url::CacheUrl;
use crate::cache::{CacheError, OpenOptions};
use aws_sdk_s3::types::StorageClass;
use std::sync::Arc;

/// Environment variable (for tests only, undocumented) that lowers the copy limit, and
/// sets the copy part size, to its value in bytes.
const COPY_PART_ENV: &str = "NARFLOW_S3_COPY_PART_SIZE";

/// The HTTP client of every S3 request, and of the credential providers: hyper 1 with
/// rustls and ring (the one TLS stack in the build; see Cargo.toml), trusting the
/// platform's root certificates.
#[must_use]
pub fn http_client() -> aws_sdk_s3::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

impl S3Cache {
    /// [`S3Cache::open`], with fixed credentials instead of the AWS chain when given.
    pub(super) fn build(
        bucket: &str,
        url: &CacheUrl,
        opts: &OpenOptions,
        credentials: Option<aws_sdk_s3::config::Credentials>,
    ) -> Result<Self, CacheError> {
        let config_err = |why: String| CacheError::Config(format!("{}: {why}", url.original));
        let rt = tokio::runtime::Builder::new_multi_thread()
            // I/O only: the requests' CPU work (signing, TLS) is small next to compression.
            .worker_threads(2)
            .thread_name("narflow-s3")
            .enable_all()
            .build()
            .map_err(|e| config_err(format!("starting the S3 runtime: {e}")))?;
        let endpoint = url.param("endpoint").map(|e| {
            if e.contains("://") {
                e.to_owned()
            } else {
                format!("{}://{e}", url.param("scheme").unwrap_or("https"))
            }
        });
        // What the narinfo record knows the bucket by: its name and where it is, not the
        // URL's other options (they do not change what the bucket holds).
        let bucket_id = match &endpoint {
            Some(e) => format!("s3://{bucket} at {e}"),
            None => format!(
                "s3://{bucket} at AWS {}",
                url.param("region").unwrap_or_default()
            ),
        };
        let path_style = match url.param("addressing-style").unwrap_or("auto") {
            "path" => true,
            "virtual" => false,
            // S3-compatible servers behind a custom endpoint rarely have per-bucket DNS.
            "auto" => endpoint.is_some(),
            other => {
                return Err(config_err(format!(
                    "addressing-style {other:?} is not path, virtual or auto"
                )));
            }
        };
        let tuning = &opts.s3;
        tuning.check().map_err(|e| config_err(e.to_string()))?;
        // The budget gave this share knowing the need (`crate::memory::Budget`); a share
        // below it is refused rather than silently exceeded.
        let need = tuning.memory_need();
        if opts.upload_memory < need.bytes {
            return Err(config_err(format!(
                "--memory {} is too small: at least {}M is needed ({}); raise --memory",
                crate::memory::Human(crate::memory::Budget::memory_for_cache(opts.upload_memory)),
                crate::memory::Budget::memory_for_cache(need.bytes).div_ceil(1 << 20),
                need.what
            )));
        }
        let retries = tuning.retries;
        let concurrency = tuning.concurrency;
        let storage_class = url.param("storage-class").map(StorageClass::from);
        // Undocumented, for tests: exercise the multi-part copy with small objects.
        let copy_part = match std::env::var(COPY_PART_ENV) {
            Err(_) => COPY_LIMIT,
            Ok(v) => match v.parse::<u64>() {
                Ok(n) if (MIN_S3_PART..=COPY_LIMIT).contains(&n) => n,
                _ => {
                    return Err(config_err(format!(
                        "{COPY_PART_ENV}={v:?} is not a number of bytes from {MIN_S3_PART} to {COPY_LIMIT}"
                    )));
                }
            },
        };

        let url_region = url.param("region");
        let profile = url.param("profile");
        let (sdk, region) = rt.block_on(async {
            // Credentials and region from narflow's own chains (see `credentials`), every
            // provider with our HTTP client.
            let conf = aws_config::provider_config::ProviderConfig::default()
                .with_http_client(http_client())
                .with_behavior_version(Some(aws_config::BehaviorVersion::latest()));
            let region = super::credentials::region(&conf, url_region, profile).await;
            let conf = conf.with_region(Some(region.clone()));
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .http_client(http_client())
                .region(region.clone())
                .credentials_provider(super::credentials::Chain::new(&conf, profile));
            if let Some(p) = profile {
                loader = loader.profile_name(p);
            }
            (loader.load().await, region)
        });
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(tuning.connect_timeout)
            .read_timeout(tuning.read_timeout)
            .build();
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(path_style)
            // Checksums only where S3 requires them: Garage, R2 and older MinIO reject
            // the newer default checksum headers.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            // Retries are ours (see `retry`), so Retry-After is honoured and fatal errors
            // are told apart.
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(e) = endpoint {
            conf = conf.endpoint_url(e);
        }
        if let Some(c) = credentials {
            conf = conf.credentials_provider(c);
        }
        let client = aws_sdk_s3::Client::from_conf(conf.build());
        Ok(S3Cache {
            shared: Arc::new(Shared {
                client,
                bucket: bucket.to_owned(),
                region: region.to_string(),
                url: url.original.clone(),
                answered: Default::default(),
                storage_class,
                retries,
                copy_part,
                rt,
                memory: Arc::new(UploadMemory::new(opts.upload_memory)),
                min_part: tuning.min_part_size,
                concurrency,
                small_in_flight: super::batch::small_in_flight(concurrency),
                multipart_commits: tokio::sync::Semaphore::new(concurrency),
                counts: Default::default(),
                owned: Default::default(),
                journal: opts.journal.clone(),
                bucket_id,
                signers: opts.signers.clone(),
                uploads: Default::default(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::S3Tuning;

    #[test]
    fn bad_parameters_are_config_errors() {
        let url = CacheUrl::parse("s3://b?addressing-style=sideways").unwrap();
        let opts = OpenOptions {
            upload_memory: 128 << 20,
            max_rate: None,
            s3: S3Tuning::default(),
            journal: None,
            signers: Vec::new(),
        };
        let e = S3Cache::open("b", &url, &opts).unwrap_err().to_string();
        assert!(e.contains("addressing-style \"sideways\""), "{e}");
        let url = CacheUrl::parse("s3://b?retries=many").unwrap();
        let e = S3Tuning::from_url(&url).unwrap_err().to_string();
        assert!(e.contains("bad value \"many\" for retries"), "{e}");
    }

    /// The share of the budget the cache is given is what it gets: one below S3's
    /// smallest part is refused at open (naming `--memory`), not raised behind the
    /// budget's back; one part's worth is enough, whatever `s3.part-size` says.
    #[test]
    fn an_upload_memory_below_one_part_of_s3s_smallest_is_refused() {
        let url = CacheUrl::parse("s3://b?endpoint=http://127.0.0.1:1&region=us-east-1").unwrap();
        let mut opts = OpenOptions {
            upload_memory: MIN_S3_PART - (1 << 20),
            max_rate: None,
            s3: S3Tuning::default(),
            journal: None,
            signers: Vec::new(),
        };
        let creds = || aws_sdk_s3::config::Credentials::new("t", "t", None, None, "tests");
        let e = S3Cache::build("b", &url, &opts, Some(creds()))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(
                "--memory 8.0 MiB is too small: at least 10M is needed (to fill one S3 part \
                 of 5.0 MiB, the smallest S3 takes); raise --memory"
            ),
            "{e}"
        );
        opts.upload_memory = MIN_S3_PART;
        assert!(S3Cache::build("b", &url, &opts, Some(creds())).is_ok());
    }

    /// The client speaks TLS to an https:// endpoint: the first bytes the server gets are
    /// a TLS handshake record (a build without an HTTPS client fails before connecting).
    #[test]
    fn an_https_endpoint_gets_a_tls_handshake() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("https://{}", l.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let (mut conn, _) = l.accept().unwrap();
            let mut first = [0u8; 3];
            conn.read_exact(&mut first).unwrap();
            tx.send(first).unwrap();
        });
        let cache = super::super::testing::cache_at(&endpoint, 64 << 20);
        let e = crate::cache::BinaryCache::has_object(&cache, "nix-cache-info").unwrap_err();
        let first = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("nothing reached the server: {e}"));
        // ContentType 22 (handshake), protocol version 3.x.
        assert_eq!(
            first[..2],
            [0x16, 0x03],
            "not a TLS record: {first:?} ({e})"
        );
    }
}
