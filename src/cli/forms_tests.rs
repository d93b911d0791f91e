//! Every option that takes a value takes it as `--flag value` and as `--flag=value`, with
//! the same meaning, on every command and subcommand of the real command line.
//!
//! The walk reads the clap `Command` the binary parses with (what `--help` prints), so a
//! new command or option is covered without listing it here. The one exception to the rule
//! is a switch (`--unsigned`, `--upload-logs`): its help shows `--unsigned[=<BOOL>]`, and
//! its optional value is attached with `=` only, because the word after a switch is the
//! next argument (a store path, for push).
use super::Cli;
use clap::{ArgAction, CommandFactory, FromArgMatches};

/// Values tried, in order, for an option without possible values: the first that its
/// parser accepts is used. An option none fits makes the test fail (add one here).
const SAMPLES: &[&str] = &[
    "3",
    "64M",
    "7d",
    "2024-01-01",
    "127.0.0.1:9464",
    "file:///tmp/narflow-forms",
    "/tmp/narflow-forms",
    "cache.example.org-1",
    "xz",
    "mixed",
    "null",
];

/// What a command may need besides the option tried (a required positional or one of a
/// required group): the first that parses is used.
const BASES: &[&[&str]] = &[
    &[],
    &["/nix/store/00000000000000000000000000000000-x"],
    &["--all"],
    &["--keep-newer-than=7d"],
    &["--keep-file=/tmp/narflow-forms"],
    &["--cache=file:///tmp/narflow-forms"],
    &["--paths=3", "--tag=t"],
    &["--paths=3"],
    &["--tag=t"],
    &["127.0.0.1:1", "5"],
    &["bash"],
];

/// Parses `argv` with the real command line; the parsed command as text, so two parses
/// can be compared whole.
fn parse(argv: &[String]) -> Result<String, clap::Error> {
    let matches = Cli::command().try_get_matches_from(argv)?;
    let cli = Cli::from_arg_matches(&matches)?;
    Ok(format!("{cli:?}"))
}

/// Every command's path from the top (`["narflow"]`, `["narflow", "push"]`, ...) with the
/// command, global options propagated.
fn commands() -> Vec<(Vec<String>, clap::Command)> {
    fn walk(path: Vec<String>, cmd: &clap::Command, out: &mut Vec<(Vec<String>, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let mut p = path.clone();
            p.push(sub.get_name().to_owned());
            walk(p, sub, out);
        }
        out.push((path, cmd.clone()));
    }
    let mut cmd = Cli::command();
    cmd.build();
    let mut out = Vec::new();
    walk(vec!["narflow".to_owned()], &cmd, &mut out);
    out
}

/// `path base option`, and a subcommand after them where `path` needs one (the top
/// level's own options come before it).
fn argv(path: &[String], base: &[&str], option: &[String]) -> Vec<String> {
    let mut v = path.to_vec();
    v.extend(base.iter().map(|s| (*s).to_owned()));
    v.extend(option.iter().cloned());
    if path.len() == 1 {
        v.push("status".to_owned());
    }
    v
}

#[test]
fn every_option_takes_its_value_both_as_a_separate_word_and_after_an_equals_sign() {
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (path, cmd) in commands() {
        let name = path.join(" ");
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if arg.is_positional() || !arg.get_action().takes_values() {
                continue;
            }
            if matches!(arg.get_action(), ArgAction::Help | ArgAction::Version) {
                continue;
            }
            let flag = format!("--{long}");
            let optional = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
            let possible: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|p| !p.is_hide_set())
                .map(|p| p.get_name().to_owned())
                .collect();
            let switch = possible == ["true", "false"];
            if optional && arg.is_require_equals_set() && !switch {
                wrong.push(format!(
                    "{name} {flag}: its value is optional and attached with `=` only, but it \
                     is not a switch: `{flag} VALUE` fails"
                ));
                continue;
            }
            // The first value and base with which `--flag=value` parses.
            let values: Vec<String> = if possible.is_empty() {
                SAMPLES.iter().map(|s| (*s).to_owned()).collect()
            } else {
                possible.iter().rev().cloned().collect()
            };
            let found = values.iter().find_map(|v| {
                BASES.iter().find_map(|base| {
                    parse(&argv(&path, base, &[format!("{flag}={v}")]))
                        .ok()
                        .map(|parsed| (v.clone(), *base, parsed))
                })
            });
            let Some((value, base, joined)) = found else {
                wrong.push(format!(
                    "{name} {flag}: no sample value parses as {flag}=VALUE (add one to SAMPLES \
                     or BASES)"
                ));
                continue;
            };
            checked += 1;
            if !(switch && arg.is_require_equals_set()) {
                let separate = argv(&path, base, &[flag.clone(), value.clone()]);
                match parse(&separate) {
                    Ok(parsed) if parsed == joined => {}
                    Ok(parsed) => wrong.push(format!(
                        "{name}: `{flag} {value}` means {parsed}, `{flag}={value}` {joined}"
                    )),
                    Err(e) => wrong.push(format!(
                        "{name}: `{flag} {value}` fails where `{flag}={value}` parses: {}",
                        e.to_string().lines().next().unwrap_or_default()
                    )),
                }
            }
            // A bare optional-value option parses, as one of its values.
            if optional {
                match parse(&argv(&path, base, std::slice::from_ref(&flag))) {
                    Ok(bare) => {
                        let same = values.iter().any(|v| {
                            parse(&argv(&path, base, &[format!("{flag}={v}")]))
                                .is_ok_and(|p| p == bare)
                        });
                        if !same {
                            wrong.push(format!("{name}: a bare `{flag}` is none of its values"));
                        }
                    }
                    Err(e) => wrong.push(format!(
                        "{name}: a bare `{flag}` fails: {}",
                        e.to_string().lines().next().unwrap_or_default()
                    )),
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} options checked");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The trap that was found: `narflow daemon --watch-store all` (as the design's usage line
/// writes it) is the same as `--watch-store=all`, and a bare `--watch-store` is `built`.
#[test]
fn watch_store_takes_its_mode_as_the_next_word() {
    let daemon = |args: &[&str]| {
        let mut argv = vec!["narflow", "daemon", "--to", "file:///tmp/c"];
        argv.extend(args);
        let matches = Cli::command().try_get_matches_from(argv).unwrap();
        match Cli::from_arg_matches(&matches).unwrap().command {
            super::Command::Daemon(d) => d.settings.daemon.watch_store,
            other => panic!("{other:?}"),
        }
    };
    use narflow::settings::WatchStore;
    assert_eq!(daemon(&["--watch-store", "all"]), Some(WatchStore::All));
    assert_eq!(daemon(&["--watch-store=all"]), Some(WatchStore::All));
    assert_eq!(daemon(&["--watch-store"]), Some(WatchStore::Built));
    assert_eq!(
        daemon(&["--watch-store", "--jobs", "2"]),
        Some(WatchStore::Built)
    );
    assert_eq!(daemon(&[]), None);
}
