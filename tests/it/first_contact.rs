//! The first mistakes with an S3 cache end a push at its first request: no credentials, a
//! wrong region, a bucket that does not exist, a key the server refuses, an endpoint
//! nothing listens at. Each gives exit 2 and one line naming the problem, no dump of the
//! SDK's warnings, and no retries: the requests are counted at a proxy in front of the
//! server, and instance metadata (IMDS) is a local listener that counts its connections,
//! so nothing here waits for 169.254.169.254.
use crate::helpers::*;
use crate::proxy::Proxy;
use std::net::TcpListener;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A stand-in for EC2 instance metadata: accepts each connection and closes it at once
/// (what a machine off EC2 amounts to, without the wait), counting them.
struct Imds {
    endpoint: String,
    connections: Arc<AtomicUsize>,
}

impl Imds {
    fn start() -> Imds {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", l.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let n = connections.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                // Counted before the close the client waits for.
                n.fetch_add(1, Ordering::SeqCst);
                drop(c);
            }
        });
        Imds {
            endpoint,
            connections,
        }
    }
}

/// The credentials' environment variables and files, all removed or pointed at nothing.
const CREDENTIAL_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_EC2_METADATA_DISABLED",
];

/// `narflow push` of a fresh path to `url`, with `env` set and `remove` removed, IMDS at
/// `imds`.
fn push(url: &str, imds: &Imds, env: &[(&str, &str)], remove: &[&str]) -> Output {
    let src = tempdir();
    let file = src.path().join(unique("first-contact"));
    std::fs::write(&file, "a path no cache has\n").unwrap();
    let path = nix_store_add(&file);
    let key = nix_generate_key("narflow-first-contact-1");
    let mut cmd = narflow();
    cmd.args(["push", "--to", url, "--key-file"])
        .arg(&key.secret)
        .arg(&path)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint)
        // No ~/.aws of the machine's.
        .env("HOME", src.path())
        .env("AWS_CONFIG_FILE", src.path().join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            src.path().join("no-credentials"),
        )
        .env_remove("NARFLOW_LOG");
    for v in remove {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run narflow")
}

/// What is wrong with the requests the server got: a push's first requests (GETs of
/// nix-cache-info and of gc's marker, at once) each sent once, none again.
fn retried(what: &str, proxy: &Proxy) -> Option<String> {
    let log = proxy.log();
    let mut keys: Vec<&str> = log.iter().map(|r| r.key()).collect();
    keys.sort_unstable();
    let n = keys.len();
    keys.dedup();
    (n == 0 || keys.len() != n || n > 2)
        .then(|| format!("{what}: not each first request once:\n{}", proxy.dump()))
}

/// What is wrong with `out` for a first-contact error: exit 2, one `narflow: ` line
/// holding each of `expect`, no SDK warning, no retry note.
fn problems(what: &str, out: &Output, expect: &[&str]) -> Vec<String> {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("{what}: exit {:?}: {}", out.status.code(), err.trim_end());
    let mut wrong = Vec::new();
    if out.status.code() != Some(2) {
        wrong.push(format!("{what}: exit {:?}, not 2", out.status.code()));
    }
    let lines: Vec<&str> = err.lines().collect();
    if lines.len() != 1 || !lines[0].starts_with("narflow: ") {
        wrong.push(format!("{what}: not one `narflow: ` line: {err}"));
    }
    for bad in ["WARN", "DispatchFailure", "gave up after"] {
        if err.contains(bad) {
            wrong.push(format!("{what}: {bad:?} in: {err}"));
        }
    }
    for e in expect {
        if !err.contains(e) {
            wrong.push(format!("{what}: {e:?} not in: {err}"));
        }
    }
    wrong
}

#[test]
fn missing_credentials_are_one_line_naming_the_sources_with_no_request_sent() {
    let Some(s3) = s3_env() else { return };
    let proxy = Proxy::start(&s3.endpoint, vec![]);
    let imds = Imds::start();
    let out = push(
        &s3.url_at(&proxy.endpoint(), ""),
        &imds,
        &[],
        CREDENTIAL_VARS,
    );
    let mut wrong = problems(
        "no credentials",
        &out,
        &[
            "no S3 credentials found",
            "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
            "profile \"default\"",
            "EC2 instance metadata",
            "environment file",
            "profile=NAME",
        ],
    );
    let sent = proxy.log().len();
    if sent != 0 {
        wrong.push(format!(
            "{sent} requests reached the server:\n{}",
            proxy.dump()
        ));
    }
    // Instance metadata asked once (its token) by each first request (there are two at
    // once), not again for a retry.
    let asked = imds.connections.load(Ordering::SeqCst);
    if !(1..=2).contains(&asked) {
        wrong.push(format!(
            "instance metadata asked {asked} times, not once or twice"
        ));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // A profile named in the URL is the one tried.
    let url = s3.url_at(&proxy.endpoint(), "&profile=builders");
    let out = push(&url, &imds, &[], CREDENTIAL_VARS);
    let wrong = problems("no credentials, profile=", &out, &["profile \"builders\""]);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn a_wrong_region_is_one_line_naming_the_region_expected_and_not_retried() {
    let Some(s3) = s3_env() else { return };
    if !s3.checks_credentials {
        println!(
            "wrong region: not checked, {} accepts any signature",
            s3.server
        );
        return;
    }
    let proxy = Proxy::start(&s3.endpoint, vec![]);
    let imds = Imds::start();
    let url = format!(
        "s3://{}?endpoint={}&region=narflow-wrong-region",
        s3.bucket,
        proxy.endpoint()
    );
    let out = push(&url, &imds, &[], &[]);
    let mut wrong = problems(
        "wrong region",
        &out,
        &[
            "region \"narflow-wrong-region\" is wrong",
            &format!("region={}", s3.region),
        ],
    );
    wrong.extend(retried("wrong region", &proxy));
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// What is tried, the bucket, the environment set, what the line must say.
type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, Vec<String>);

#[test]
fn a_missing_bucket_or_a_refused_key_is_one_line_and_not_retried() {
    let Some(s3) = s3_env() else { return };
    let imds = Imds::start();
    let missing = format!("narflow-no-such-bucket-{}", unique("b").replace('-', ""));
    let mut cases: Vec<Case> = vec![(
        "missing bucket",
        missing.clone(),
        vec![],
        vec![missing.clone(), "does not exist".into()],
    )];
    if s3.checks_credentials {
        cases.push((
            "unknown access key",
            s3.bucket.clone(),
            vec![("AWS_ACCESS_KEY_ID", "GKnarflowunknownkey0000000")],
            vec!["AWS_ACCESS_KEY_ID".into()],
        ));
        cases.push((
            "wrong secret key",
            s3.bucket.clone(),
            vec![("AWS_SECRET_ACCESS_KEY", "wrong")],
            vec!["AWS_SECRET_ACCESS_KEY".into()],
        ));
    }
    let mut wrong = Vec::new();
    for (what, bucket, env, expect) in cases {
        let proxy = Proxy::start(&s3.endpoint, vec![]);
        let url = format!(
            "s3://{bucket}?endpoint={}&region={}",
            proxy.endpoint(),
            s3.region
        );
        let out = push(&url, &imds, &env, &[]);
        let expect: Vec<&str> = expect.iter().map(String::as_str).collect();
        wrong.extend(problems(what, &out, &expect));
        wrong.extend(retried(what, &proxy));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn an_endpoint_that_refuses_connections_is_one_line_and_not_retried() {
    let Some(s3) = s3_env() else { return };
    let imds = Imds::start();
    // A port nothing listens at: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let url = s3.url_at(&endpoint, "");
    let out = push(&url, &imds, &[], &[]);
    let mut wrong = problems(
        "refused",
        &out,
        &[
            "cannot reach the S3 endpoint",
            &endpoint,
            "Connection refused",
        ],
    );
    // Each retry would be logged at debug level; there is none.
    let out = push(&url, &imds, &[("NARFLOW_LOG", "narflow=debug")], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(2) || err.contains("(retry ") {
        wrong.push(format!("refused, retried: {err}"));
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}
