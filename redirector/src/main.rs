//! The `redirector` binary: operator CLI (and, later, the agent).
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = redirector::cli::Cli::parse();
    match redirector::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            let msg = msg.replace('\n', " ");
            // Verifier logs run to megabytes; its end says what went wrong.
            let msg = if msg.len() > 1500 {
                let head: String = msg.chars().take(300).collect();
                let tail: String = msg.chars().rev().take(1000).collect::<Vec<_>>().into_iter().rev().collect();
                format!("{head} [...] {tail}")
            } else {
                msg
            };
            eprintln!("error: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
