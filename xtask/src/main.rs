//! `cargo xtask`: the project's developer commands. Owns argument parsing and dispatch only;
//! each command lives in its own module (`setup`, `test`, `demo`).

mod cgroup;
mod demo;
mod interrupt;
mod proc;
mod setup;
mod test;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "HMS developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and running HMS needs (apt packages, nightly rust-src,
    /// bpf-linker); skips whatever is already present.
    Setup,
    /// Run setup, build every binary, run every test (the vm-tests need root), print a summary.
    Test {
        /// Passed to the test binaries, e.g. a name filter: `cargo xtask test -- dns`.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Run the seed story on this host: agent, four services in a demo cgroup, an unmodified
    /// curl calling payments-svc.svc and notify-svc.svc; tears everything down afterwards.
    Demo {
        /// Exit after the story instead of waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test { test_args } => test::run(&test_args),
        Command::Demo { once } => demo::run(once),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
