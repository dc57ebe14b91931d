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
            eprintln!("error: {}", msg.replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}
