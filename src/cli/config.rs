//! `narflow config`: the merged settings and where each value came from, as the daemon
//! would see them with the same flags (every command reads the same file and variables;
//! `push` ignores the `[daemon]` and `[hook]` tables).
use super::{CliError, exit};
use narflow::settings::{KEYS, Merged, Settings, format_size};

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// Print the settings as JSON: `config_file` and `settings` (each with `key`, `value`,
    /// `source`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub settings: Settings,
}

pub fn run(args: &ConfigArgs, merged: &Merged) -> Result<u8, CliError> {
    let resolved = merged.resolve().map_err(CliError::usage)?;
    let entries = resolved.entries();
    let (path, source) = match &merged.config {
        Some(c) => (c.path.display().to_string(), c.source.to_string()),
        None => (String::new(), "none".to_owned()),
    };
    if args.json {
        let out = serde_json::json!({
            "config_file": { "path": path, "source": source, "read": merged.config_read },
            "settings": entries,
        });
        print_out(&format!("{out}\n"));
        return Ok(exit::OK);
    }
    // TOML (dotted keys for the tables), so a line can be copied into the file; each
    // value's source in a comment.
    let mut text = format!(
        "# config file: {path} ({source}; {})\n",
        if merged.config_read {
            "read"
        } else {
            "not present"
        }
    );
    for e in &entries {
        let note = match e.value.as_u64() {
            Some(n) if KEYS.iter().any(|k| k.name == e.key && k.is_size()) => {
                format!(" ({})", format_size(n))
            }
            _ => String::new(),
        };
        if e.value.is_null() {
            text.push_str(&format!("# {} is not set  # {}\n", e.key, e.source));
        } else {
            text.push_str(&format!("{} = {}  # {}{note}\n", e.key, e.value, e.source));
        }
    }
    print_out(&text);
    Ok(exit::OK)
}

/// Writes to stdout; a reader that went away (`narflow config | head`) is not an error.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}
