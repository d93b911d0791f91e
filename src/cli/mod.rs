//! Command-line definitions (clap derive) and the glue from arguments to the library.
//! One file per command. Nothing here does work the library could do.

pub mod backfill;
pub mod bench;
pub mod completions;
pub mod config;
pub mod daemon;
pub mod gc;
pub mod hook;
pub mod man;
pub mod progress;
pub mod push;
pub mod status;
pub mod verify;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, Parser, Subcommand};
use narflow::handoff::config::CONFIG_ENV;
use narflow::settings::{ConfigChoice, Merged, Settings, clap_source};
use std::path::PathBuf;

/// Exit codes (documented in the README).
pub mod exit {
    /// Every path succeeded.
    pub const OK: u8 = 0;
    /// Some paths failed; each was reported.
    pub const SOME_FAILED: u8 = 1;
    /// Usage or configuration error; nothing was done.
    pub const USAGE: u8 = 2;
}

/// An error that stops a command, with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub error: anyhow::Error,
}

impl CliError {
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        CliError {
            code: exit::USAGE,
            error: error.into(),
        }
    }
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        CliError {
            code: exit::SOME_FAILED,
            error: error.into(),
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "narflow",
    version,
    about = "Upload Nix store paths to binary caches, fast and with bounded memory"
)]
pub struct Cli {
    /// More log output (-v: each path; -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Config file (TOML) [default: /etc/narflow/narflow.toml, when it exists].
    #[arg(long, global = true, env = CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload store paths (and their closure) to a binary cache.
    Push(push::PushArgs),
    /// Upload a whole store (or what was registered since a date, or the closures of the
    /// given paths) in resumable windows, skipping what the cache or an upstream has.
    Backfill(backfill::BackfillArgs),
    /// Run the upload daemon: queue paths from `narflow hook` durably and upload them.
    Daemon(daemon::DaemonArgs),
    /// Post-build-hook: hand $OUT_PATHS to the daemon (or its spool); always exits 0.
    Hook(hook::HookArgs),
    /// Show the daemon's queue: pending, in flight, done, failing with the last error.
    Status(status::StatusArgs),
    /// Check a cache: every narinfo parses, is signed by a trusted key, has its NAR at
    /// its FileSize and its references' narinfos; report orphan NARs and leftovers.
    Verify(verify::VerifyArgs),
    /// Delete from a cache what no root keeps (closures of named paths, recent narinfos),
    /// referrers before what they refer to, so no reader sees a broken closure.
    Gc(gc::GcArgs),
    /// Print the merged settings (the daemon's view, with the same flags) and where each
    /// value came from.
    Config(config::ConfigArgs),
    /// Measure the pipeline on synthetic store paths; compare with a saved baseline.
    Bench(bench::BenchArgs),
    /// Print the shell completion script for bash, zsh or fish.
    Completions(completions::CompletionsArgs),
    /// Write man pages (narflow.1, narflow-push.1, ..., narflow-hook.1) into a directory.
    Man(man::ManArgs),
}

/// Runs the parsed command (`matches` is what clap parsed it from); returns the exit code.
pub fn run(cli: Cli, matches: &ArgMatches) -> Result<u8, CliError> {
    let choice = || {
        let from_env = matches.value_source("config") == Some(ValueSource::EnvVariable);
        ConfigChoice::new(cli.config.clone(), from_env)
    };
    let sub = |name: &str| matches.subcommand_matches(name).unwrap_or(matches);
    match cli.command {
        Command::Push(ref args) => push::run(args, &merge(&args.settings, sub("push"), choice())?),
        Command::Backfill(ref args) => {
            backfill::run(args, &merge(&args.settings, sub("backfill"), choice())?)
        }
        Command::Bench(args) => bench::run(args, sub("bench")),
        Command::Completions(ref args) => completions::run(args),
        Command::Man(ref args) => man::run(args),
        Command::Daemon(ref args) => {
            daemon::run(args, &merge(&args.settings, sub("daemon"), choice())?)
        }
        Command::Verify(ref args) => {
            verify::run(args, &merge(&args.settings, sub("verify"), choice())?)
        }
        Command::Gc(ref args) => gc::run(args, &merge(&args.settings, sub("gc"), choice())?),
        Command::Config(ref args) => {
            config::run(args, &merge(&args.settings, sub("config"), choice())?)
        }
        Command::Hook(args) => Ok(hook::run_with_config(
            args,
            cli.verbose > 0,
            cli.config.as_deref(),
        )),
        Command::Status(mut args) => {
            // The socket and state directory of the file, unless given by flag or
            // environment.
            let sub = sub("status");
            if let Some(file) = choice().load().map_err(CliError::usage)? {
                let given = |id: &str| sub.value_source(id) != Some(ValueSource::DefaultValue);
                if let (false, Some(s)) = (given("socket"), file.settings.socket) {
                    args.socket = s;
                }
                if let (false, Some(d)) = (given("state_dir"), file.settings.state_dir) {
                    args.state_dir = d;
                }
            }
            status::run(args)
        }
    }
}

/// Refuses a setting of the daemon, the hook or gc given to another `command` (push,
/// backfill, verify) on its command line, but the keys `allowed` it: a mistake there (in
/// the shared file or environment it is simply not the command's).
fn refuse_other_commands_flags(
    resolved: &narflow::settings::Resolved,
    command: &str,
    allowed: &[&str],
) -> Result<(), CliError> {
    for key in narflow::settings::KEYS.iter() {
        if let (Some(table @ ("daemon" | "hook" | "gc")), narflow::settings::Source::Flag(flag)) =
            (key.table(), resolved.source(key.name))
            && table != command
            && !allowed.contains(&key.name)
        {
            return Err(CliError::usage(anyhow::anyhow!(
                "{flag} is a setting of narflow {table}, not of {command}"
            )));
        }
    }
    Ok(())
}

/// The upload journal of a push or backfill to `url`, kept in the file `path` (S3 only:
/// other caches have no multipart uploads to resume). `None` without a file or for
/// another cache. A journal that cannot be opened at the default place is skipped with a
/// warning (the run goes on without resume); at a place the user gave, it is an error.
///
/// # Errors
/// A usage error when the journal the user named cannot be opened.
fn open_journal(
    url: &narflow::cache::url::CacheUrl,
    path: Option<PathBuf>,
    given: bool,
) -> Result<Option<std::sync::Arc<dyn narflow::cache::resume::UploadJournal>>, CliError> {
    let (narflow::cache::url::CacheLocation::S3 { .. }, Some(path)) = (&url.location, path) else {
        return Ok(None);
    };
    let opened = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    narflow::cache::CacheError::Config(format!(
                        "upload journal {}: its directory cannot be made: {e}",
                        path.display()
                    ))
                })
        }
        None => Ok(()),
    }
    .and_then(|()| narflow::cache::resume::SqliteJournal::open(&path));
    match opened {
        Ok(j) => Ok(Some(std::sync::Arc::new(j))),
        Err(e) if !given => {
            tracing::warn!("{e}; large uploads of this run cannot be resumed");
            Ok(None)
        }
        Err(e) => Err(CliError::usage(anyhow::anyhow!("{e} (upload-journal)"))),
    }
}

/// Ends the journal's records that no later run will resume (their paths are in the
/// cache or gone from the store, or they are older than `max_age`), before or after a
/// push or backfill (`when`); a failure is only logged (the records stay).
fn end_records(
    journal: Option<&std::sync::Arc<dyn narflow::cache::resume::UploadJournal>>,
    cache: &dyn narflow::cache::BinaryCache,
    store: &narflow::store::LocalStore,
    max_age: std::time::Duration,
    when: &str,
) {
    let Some(journal) = journal else { return };
    let unknown = |_: &str| narflow::pipeline::resume::PathState::Unknown;
    match narflow::pipeline::resume::end_records(journal.as_ref(), cache, store, max_age, &unknown)
    {
        Ok(e) if !e.ended.is_empty() => tracing::info!(
            "{when}: ended {} recorded uploads no run will resume; {} kept",
            e.ended.len(),
            e.kept
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{when}: recorded uploads: {e}"),
    }
}

/// The path arguments of push and backfill: each `-` replaced by the whitespace-separated
/// words of `stdin`, read whole.
///
/// # Errors
/// A usage error when `stdin` cannot be read.
fn path_arguments(args: &[String], mut stdin: impl std::io::Read) -> Result<Vec<String>, CliError> {
    let mut inputs = Vec::new();
    for p in args {
        if p == "-" {
            let mut s = String::new();
            stdin
                .read_to_string(&mut s)
                .map_err(|e| CliError::usage(anyhow::anyhow!("reading paths from stdin: {e}")))?;
            inputs.extend(s.split_whitespace().map(str::to_owned));
        } else {
            inputs.push(p.clone());
        }
    }
    Ok(inputs)
}

/// The command's settings: its flags and `NARFLOW_*` variables (`flags`, parsed from
/// `matches`) over the config file.
///
/// # Errors
/// A usage error for a config file that cannot be read or used.
fn merge(flags: &Settings, matches: &ArgMatches, choice: ConfigChoice) -> Result<Merged, CliError> {
    let file = choice.load().map_err(CliError::usage)?;
    let cmd = Settings::augment_args(clap::Command::new("settings"));
    Ok(Merged::new(
        flags.clone(),
        |id| clap_source(matches, id, &cmd),
        Some(choice),
        file,
    ))
}

#[cfg(test)]
mod forms_tests;

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// A journal file that cannot be opened is named once, with what is wrong.
    #[test]
    fn a_journal_that_cannot_be_opened_is_named_once() {
        let dir = tempfile::tempdir().unwrap();
        let url =
            narflow::cache::url::CacheUrl::parse("s3://b?endpoint=http://127.0.0.1:9").unwrap();
        let file = dir.path().join("j.sqlite");
        std::fs::create_dir(&file).unwrap();
        let Err(e) = super::open_journal(&url, Some(file.clone()), true) else {
            panic!("a directory opened as a journal");
        };
        let text = format!("{:#}", e.error);
        let name = file.display().to_string();
        assert_eq!(text.matches(&name).count(), 1, "{text}");
        assert!(text.contains("unable to open database file"), "{text}");
        assert!(text.contains("(upload-journal)"), "{text}");
        assert!(matches!(
            super::open_journal(&url, Some(file), false),
            Ok(None)
        ));
    }

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn a_dash_among_path_arguments_is_replaced_by_the_words_of_stdin() {
        let args: Vec<String> = ["/a", "-", "/b"].map(String::from).to_vec();
        let stdin = &b"/x\n /y\t/z\n\n"[..];
        let got = super::path_arguments(&args, stdin).unwrap();
        assert_eq!(got, ["/a", "/x", "/y", "/z", "/b"]);
    }
}
