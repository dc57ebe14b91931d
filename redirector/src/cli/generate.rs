//! Shell completions and manual pages, generated from the CLI's own definition so that they
//! never drift from it (`redirector completions SHELL`, `redirector man [--dir DIR]`).

use std::{io::Write as _, path::Path};

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut Cli::command(), "redirector", &mut out);
    out.flush().context("writing the completion script")
}

/// Writes the manual page of `redirector` to stdout, or, with `dir`, one page per command
/// (`redirector.1`, `redirector-rule.1`, `redirector-rule-add.1`, ...) into `dir`.
pub fn man(dir: Option<&Path>) -> anyhow::Result<()> {
    match dir {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(Cli::command()).render(&mut out).context("writing the manual page")?;
            out.flush().context("writing the manual page")
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir).with_context(|| format!("writing the manual pages into {}", dir.display()))?;
            eprintln!("manual pages written to {} (`man redirector` once it is in the MANPATH)", dir.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Every command's name, as `redirector rule add` gives `redirector-rule-add`.
    fn pages(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
        let name = if prefix.is_empty() { cmd.get_name().to_string() } else { format!("{prefix}-{}", cmd.get_name()) };
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            pages(sub, &name, out);
        }
        out.push(name);
    }

    /// What bash completes after `words` (the last one being completed), with the script
    /// `redirector completions bash` prints.
    fn bash_completes(words: &[&str]) -> Vec<String> {
        let mut script = Vec::new();
        clap_complete::generate(clap_complete::Shell::Bash, &mut Cli::command(), "redirector", &mut script);
        let file = std::env::temp_dir().join(format!("redirector-completion-{}.bash", std::process::id()));
        std::fs::write(&file, &script).expect("writing the script");
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let program = format!(
            "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; _redirector redirector '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            file.display(),
            quoted.join(" "),
            words.len() - 1,
            words[words.len() - 1],
            words[words.len().saturating_sub(2)],
        );
        let out = Command::new("bash").args(["--norc", "-c", &program]).output().expect("running bash");
        let _ = std::fs::remove_file(&file);
        assert!(out.status.success(), "bash failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    #[test]
    fn bash_completes_commands_subcommands_and_flags() {
        assert_eq!(bash_completes(&["redirector", "giv"]), ["give-back"], "a command");
        let rule = bash_completes(&["redirector", "rule", ""]);
        for sub in ["add", "del", "list"] {
            assert!(rule.iter().any(|w| w == sub), "rule's subcommand {sub} in {rule:?}");
        }
        assert!(bash_completes(&["redirector", "status", "--so"]).iter().any(|w| w == "--socket"), "a flag of status");
    }

    #[test]
    fn a_manual_page_for_every_command() {
        let dir = std::env::temp_dir().join(format!("redirector-man-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        man(Some(&dir)).expect("writing the pages");
        let mut want = Vec::new();
        pages(&Cli::command(), "", &mut want);
        for p in &want {
            let page = std::fs::read_to_string(dir.join(format!("{p}.1"))).unwrap_or_else(|e| panic!("no page {p}.1: {e}"));
            assert!(page.starts_with(".ie") || page.contains(".TH"), "{p}.1 is a manual page:\n{page}");
        }
        let main = std::fs::read_to_string(dir.join("redirector.1")).expect("redirector.1");
        for sub in Cli::command().get_subcommands() {
            // roff writes a hyphen as `\-`.
            assert!(main.contains(&sub.get_name().replace('-', "\\-")), "redirector.1 lists {}", sub.get_name());
        }
        assert!(want.len() > 20, "every command has its page: {want:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_commands_parse() {
        for args in [&["redirector", "completions", "zsh"][..], &["redirector", "man"], &["redirector", "man", "--dir", "/tmp/x"]] {
            <Cli as clap::Parser>::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(<Cli as clap::Parser>::try_parse_from(["redirector", "completions", "tcsh"]).is_err(), "an unknown shell is refused");
    }
}
