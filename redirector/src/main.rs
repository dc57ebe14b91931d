//! The `redirector` binary: the operator CLI, and the agent (`redirector agent`).
use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // Die quietly on a closed pipe (`redirector rule list | head`), like other Unix tools.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = match redirector::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return std::process::ExitCode::SUCCESS;
        }
        Err(e) => {
            // A usage error, in one line (exit code 2, as clap and other tools use).
            let text = e.render().to_string();
            let msg: Vec<&str> = text.lines().take_while(|l| !l.starts_with("Usage:")).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("For more information")).collect();
            eprintln!("{}", msg.join(" "));
            return std::process::ExitCode::from(2);
        }
    };
    // Logs (the agent's decisions) to stderr; aya-log and other `log` users are bridged.
    let _ = tracing_log::LogTracer::init();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    // A panic ends the process, whichever thread or task it happens in (`panic = "abort"`,
    // for every build): the agent must never go on without the task that panicked (no accept
    // loop, no liveness checks) or with a lock it poisoned. Its state is pinned in the kernel
    // and its records on disk, so a service manager that restarts it loses nothing
    // (contrib/redirector.service: Restart=on-failure).
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!("panic: {info}; exiting (the pinned rules stay in place; restart the agent)");
        std::process::abort();
    }));
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
