//! `narflow man DIR`: man pages made from the command-line definitions (clap_mangen):
//! narflow.1, one page per subcommand (narflow-push.1, narflow-bench-make-store.1, ...)
//! and narflow-hook.1 for the stand-alone hook, written into DIR.
use super::{Cli, CliError, exit};
use clap::CommandFactory;
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// The directory to write the pages into (made if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// Writes the pages and names each on stderr.
///
/// # Errors
/// A usage error when DIR cannot be made or written.
pub fn run(args: &ManArgs) -> Result<u8, CliError> {
    let written = write_pages(&args.dir).map_err(|e| {
        CliError::usage(anyhow::anyhow!(
            "writing man pages into {}: {e}",
            args.dir.display()
        ))
    })?;
    eprintln!(
        "narflow: {} man pages written into {}",
        written.len(),
        args.dir.display()
    );
    Ok(exit::OK)
}

/// Writes every page into `dir` (made if missing); the files written.
///
/// # Errors
/// An I/O error of the first page that cannot be written.
pub fn write_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    page(&cmd, dir, &mut written)?;
    let hook = hook_command(&cmd);
    written.push(clap_mangen::Man::new(hook).generate_to(dir)?);
    Ok(written)
}

/// `cmd`'s page and those of its subcommands that `--help` lists.
fn page(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub, dir, written)?;
    }
    written.push(clap_mangen::Man::new(cmd.clone()).generate_to(dir)?);
    Ok(())
}

/// The stand-alone `narflow-hook` (no argument parser of its own): `narflow hook`'s
/// options under its name, without `--help`, which it does not take.
fn hook_command(built: &clap::Command) -> clap::Command {
    let hook = built
        .find_subcommand("hook")
        .expect("narflow has a hook command");
    let mut page = clap::Command::new("narflow-hook")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "Post-build-hook for nix.conf (post-build-hook = /path/to/narflow-hook): hands \
             $OUT_PATHS to the narflow daemon, or its spool when the daemon is down; always \
             exits 0",
        )
        .disable_help_flag(true)
        .disable_version_flag(true);
    for arg in hook.get_arguments() {
        if !matches!(
            arg.get_action(),
            clap::ArgAction::Help | clap::ArgAction::HelpLong | clap::ArgAction::Version
        ) {
            page = page.arg(arg.clone().global(false));
        }
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page per subcommand `--help` lists, each naming its own flags; narflow-hook's
    /// names the hook's.
    #[test]
    fn a_page_per_subcommand_names_its_flags() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_pages(dir.path()).unwrap();
        let read = |name: &str| {
            std::fs::read_to_string(dir.path().join(name))
                .unwrap_or_else(|e| panic!("{name}: {e} (written: {written:?})"))
        };
        let main = read("narflow.1");
        assert!(main.contains(".TH narflow 1"), "{main}");
        let cmd = Cli::command();
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_name();
            let page = read(&format!("narflow-{name}.1"));
            assert!(main.contains(name), "narflow.1 does not list {name}");
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    // roff escapes each dash: \-\-watch\-store
                    let escaped = format!("--{long}").replace('-', "\\-");
                    assert!(page.contains(&escaped), "narflow-{name}.1 lacks --{long}");
                }
            }
        }
        let bench = read("narflow-bench-make-store.1");
        assert!(bench.contains("\\-\\-paths"), "{bench}");
        let hook = read("narflow-hook.1");
        for flag in ["socket", "state\\-dir", "timeout", "config"] {
            assert!(
                hook.contains(&format!("\\-\\-{flag}")),
                "narflow-hook.1: {flag}"
            );
        }
        assert!(!hook.contains("\\-\\-help"), "{hook}");
        assert!(
            written.len() >= cmd.get_subcommands().count() + 2,
            "{written:?}"
        );
    }
}
