//! The `optc` command: check, compile and run optimizer rules (see [`cli`]).

use clap::Parser;
use std::process::ExitCode;

mod cli;

/// Restores the default SIGPIPE action, so `optc ... | head` ends quietly like other command-line
/// tools instead of failing on a closed pipe.
#[allow(unsafe_code)]
fn quiet_broken_pipes() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_DFL at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    quiet_broken_pipes();
    cli::execute(cli::Cli::parse())
}
