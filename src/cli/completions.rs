//! `narflow completions SHELL`: the shell's completion script for narflow, made from the
//! command-line definitions (clap_complete), on stdout.
use super::{Cli, CliError, exit};
use clap::CommandFactory;

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh or fish.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The shells narflow writes completions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the script to stdout.
///
/// # Errors
/// A failed command when stdout cannot be written.
pub fn run(args: &CompletionsArgs) -> Result<u8, CliError> {
    use std::io::Write;
    let mut out = Vec::new();
    write(args.shell, &mut out);
    std::io::stdout()
        .write_all(&out)
        .map_err(|e| CliError::failed(anyhow::anyhow!("writing the completions: {e}")))?;
    Ok(exit::OK)
}

/// The completion script for `shell`.
pub fn write(shell: Shell, out: &mut dyn std::io::Write) {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "narflow", out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: Shell) -> String {
        let mut out = Vec::new();
        write(shell, &mut out);
        String::from_utf8(out).unwrap()
    }

    /// Every subcommand (and a flag of each) is in the bash script; zsh and fish name
    /// them too.
    #[test]
    fn the_completion_scripts_name_every_subcommand() {
        let bash = script(Shell::Bash);
        let zsh = script(Shell::Zsh);
        let fish = script(Shell::Fish);
        assert!(bash.contains("complete -F _narflow"), "{bash}");
        let cmd = Cli::command();
        let subs: Vec<&clap::Command> = cmd.get_subcommands().collect();
        assert!(subs.len() >= 11, "{}", subs.len());
        for sub in subs {
            let name = sub.get_name();
            for (shell, text) in [("bash", &bash), ("zsh", &zsh), ("fish", &fish)] {
                assert!(text.contains(name), "{shell}: {name} missing");
            }
            // bash lists each subcommand's options under its own case.
            let case = format!("narflow__subcmd__{})", name.replace('-', "__"));
            assert!(bash.contains(&case), "bash: no case {case}");
        }
        for flag in ["--watch-store", "--to", "--key-file", "--keep-newer-than"] {
            assert!(bash.contains(flag), "bash: {flag}");
            assert!(fish.contains(&flag[2..]), "fish: {flag}");
        }
    }
}
