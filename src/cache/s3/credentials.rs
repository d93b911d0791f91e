//! Where an S3 cache's credentials and region come from, and one error naming every
//! source tried when none gives credentials.
//!
//! Credentials: the sources of the AWS SDK's default chain, in its order: the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), the profile (`profile=` in the URL, else
//! `AWS_PROFILE`, else `default`, from `~/.aws/credentials` and `~/.aws/config`, with
//! `credential_process` and SSO), a web identity token, ECS container credentials, and EC2
//! instance metadata (IMDS). IMDS stays in the chain, as in Nix's own S3 store, because an
//! EC2 builder's instance role is a common way to give credentials; but it is asked once,
//! with one-second timeouts, so a machine off EC2 learns within a second that there is
//! none (`AWS_EC2_METADATA_DISABLED=true` skips it).
//!
//! Region: `region=` in the URL, else `AWS_REGION`/`AWS_DEFAULT_REGION`, else the profile's,
//! else `us-east-1` (Nix's default). Never IMDS: a cache's region is a property of its
//! bucket, not of the machine that uploads.
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{self, ProvideCredentials, future};
use std::time::Duration;

/// No source gave credentials: the sources tried, and what stopped the chain if a source
/// failed rather than had none. Found in an S3 request's error by [`missing_in`].
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct MissingCredentials {
    tried: Vec<String>,
    /// The source that failed, and why (a profile that cannot be read, a failing
    /// `credential_process`, ...).
    failed: Option<(String, String)>,
}

impl MissingCredentials {
    fn describe(&self) -> String {
        let found = match &self.failed {
            None => format!("no S3 credentials found (tried {})", self.tried.join(", ")),
            Some((source, why)) => format!(
                "no S3 credentials: {source} failed: {why} (tried {})",
                self.tried.join(", ")
            ),
        };
        format!(
            "{found}; give them in the environment (AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY; for the NixOS service, in its environment file) or as \
             a profile (profile=NAME in the cache URL)"
        )
    }
}

/// The credentials error in `e`'s chain of sources, if it has one.
pub(super) fn missing_in<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a MissingCredentials> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(m) = e.downcast_ref::<MissingCredentials>() {
            return Some(m);
        }
        next = e.source();
    }
    None
}

/// `e` and its sources as one line: each message once (many repeat their source's).
pub(super) fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(e);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = e.source();
    }
    out.replace('\n', " ")
}

/// The sources, tried in order: the first that gives credentials wins; one that has none
/// passes to the next; one that fails stops the chain (as the SDK's own chain does).
pub(super) struct Chain {
    sources: Vec<(String, Box<dyn ProvideCredentials>)>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.sources.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Chain").field("sources", &names).finish()
    }
}

impl Chain {
    /// The chain for `profile` (the URL's `profile=`, else `AWS_PROFILE`, else `default`).
    pub(super) fn new(conf: &ProviderConfig, profile: Option<&str>) -> Chain {
        use aws_config::{ecs, environment, imds, profile as prof, web_identity_token};
        let profile_name = profile
            .map(str::to_owned)
            .or_else(|| std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty()));
        let mut profile_provider = prof::ProfileFileCredentialsProvider::builder().configure(conf);
        if let Some(p) = &profile_name {
            profile_provider = profile_provider.profile_name(p);
        }
        let imds_client = imds::Client::builder()
            .configure(conf)
            .max_attempts(1)
            .connect_timeout(Duration::from_secs(1))
            .read_timeout(Duration::from_secs(1))
            .build();
        let sources: Vec<(String, Box<dyn ProvideCredentials>)> = vec![
            (
                "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)".into(),
                Box::new(environment::EnvironmentVariableCredentialsProvider::new()),
            ),
            (
                format!(
                    "profile {:?} (~/.aws/credentials, ~/.aws/config)",
                    profile_name.as_deref().unwrap_or("default")
                ),
                Box::new(profile_provider.build()),
            ),
            (
                "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)".into(),
                Box::new(
                    web_identity_token::WebIdentityTokenCredentialsProvider::builder()
                        .configure(conf)
                        .build(),
                ),
            ),
            (
                "ECS container credentials".into(),
                Box::new(
                    ecs::EcsCredentialsProvider::builder()
                        .configure(conf)
                        .build(),
                ),
            ),
            (
                "EC2 instance metadata".into(),
                Box::new(
                    imds::credentials::ImdsCredentialsProvider::builder()
                        .configure(conf)
                        .imds_client(imds_client)
                        .build(),
                ),
            ),
        ];
        Chain { sources }
    }

    async fn credentials(&self) -> provider::Result {
        let mut tried = Vec::new();
        let last = self.sources.len() - 1;
        for (i, (name, source)) in self.sources.iter().enumerate() {
            tried.push(name.clone());
            match source.provide_credentials().await {
                Ok(c) => {
                    tracing::debug!("S3 credentials from {name}");
                    return Ok(c);
                }
                // Off EC2, instance metadata answers with an error or not at all: that is
                // "none there", not a failure to report.
                Err(e) if i == last => {
                    tracing::debug!("S3 credentials: none from {name}: {}", one_line(&e));
                }
                Err(CredentialsError::CredentialsNotLoaded(_)) => {
                    tracing::debug!("S3 credentials: none from {name}");
                }
                Err(e) => {
                    let why = one_line(&e);
                    return Err(CredentialsError::provider_error(MissingCredentials {
                        tried,
                        failed: Some((name.clone(), why)),
                    }));
                }
            }
        }
        Err(CredentialsError::not_loaded(MissingCredentials {
            tried,
            failed: None,
        }))
    }
}

impl ProvideCredentials for Chain {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.credentials())
    }
}

/// The region: `url_region`, else the environment's, else `profile`'s, else `us-east-1`.
pub(super) async fn region(
    conf: &ProviderConfig,
    url_region: Option<&str>,
    profile: Option<&str>,
) -> aws_config::Region {
    use aws_config::meta::region::ProvideRegion;
    if let Some(r) = url_region {
        return aws_config::Region::new(r.to_owned());
    }
    if let Some(r) = aws_config::environment::EnvironmentVariableRegionProvider::new()
        .region()
        .await
    {
        return r;
    }
    let mut from_profile =
        aws_config::profile::ProfileFileRegionProvider::builder().configure(conf);
    if let Some(p) = profile {
        from_profile = from_profile.profile_name(p);
    }
    from_profile
        .build()
        .region()
        .await
        .unwrap_or_else(|| aws_config::Region::from_static("us-east-1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message names every source and how to give credentials, on one line.
    #[test]
    fn missing_credentials_name_the_sources_and_the_ways_to_give_them() {
        let conf = ProviderConfig::default().with_http_client(super::super::http_client());
        let chain = Chain::new(&conf, Some("builders"));
        let m = MissingCredentials {
            tried: chain.sources.iter().map(|(n, _)| n.clone()).collect(),
            failed: None,
        };
        let text = m.to_string();
        for part in [
            "AWS_ACCESS_KEY_ID",
            "profile \"builders\"",
            "web identity",
            "ECS",
            "EC2 instance metadata",
            "environment file",
            "profile=NAME",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(!text.contains('\n'), "{text}");
        let wrapped = CredentialsError::not_loaded(m);
        assert!(missing_in(&wrapped).is_some());
    }
}
