//! `cargo xtask`: the project's developer commands. Owns argument parsing and dispatch only;
//! each command lives in its own module (`setup`, `test`, `demo`, `vmtest`).

mod cgroup;
mod demo;
mod interrupt;
mod proc;
mod setup;
mod test;
mod vm_cpio;
mod vm_init;
mod vm_kernel;
mod vm_qemu;
mod vm_rootfs;
mod vmtest;
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
    /// Run setup, build every binary, run every test (the vm-tests need root), then the
    /// vm-tests again in a VM on Debian's 6.1 kernel; print one summary.
    Test {
        /// Skip the VM run (the vm-tests still run on this host's kernel).
        #[arg(long)]
        no_vm: bool,
        /// Passed to the test binaries, e.g. a name filter: `cargo xtask test -- dns`.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Run the vm-tests inside a QEMU VM (no network) on Debian's 6.1 kernel, downloaded
    /// once into target/vm/; the console is streamed and kept in target/vm/console.log.
    VmTest {
        /// Passed to the test binaries in the VM, e.g. a name filter: `cargo xtask vm-test -- dns`.
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
        Command::Test { no_vm, test_args } => test::run(&test_args, !no_vm),
        Command::VmTest { test_args } => vmtest::run(&test_args),
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
