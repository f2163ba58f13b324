//! `outriderctl`: the operator's CLI. Exit codes: 0 success, 1 the policy or the request was
//! rejected, 4 `apply --wait`: a proxy NACKed or did not answer in time, 64 bad usage, 66
//! unreadable input, 69 control plane unreachable, 70 unexpected answer, 77 token refused;
//! `check`: 0 nothing found, 1 errors, 2 warnings only.

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

/// Outrider's command-line client.
#[derive(Debug, Parser)]
#[command(name = "outriderctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Checks policy files offline; prints every error and warning with file, line, column
    /// and a caret. Exits 0 if valid, 1 on errors (or warnings with --strict), 66 if an input
    /// cannot be read.
    Validate(outrider_control::validate::ValidateArgs),
    /// Adds the sidecar to Kubernetes manifests (files, `-` or stdin) and prints them.
    Inject(Box<outrider_control::inject::InjectArgs>),
    /// Waits until the proxy's /ready answers 200 (the legacy sidecar's postStart hook).
    WaitReady(outrider_control::wait::WaitArgs),
    /// Applies policy documents on the control plane: shows each one's diff against the
    /// version in force and pushes it; exits 1 if one is rejected.
    Apply(outrider_control::cli::ApplyArgs),
    /// Connected proxies (workload, version applied, when, state, last NACK) and rejected
    /// documents; --all adds the disconnected proxies.
    Status(outrider_control::cli::StatusArgs),
    /// The kept versions, newest first.
    History(outrider_control::cli::ReadArgs),
    /// Makes a kept version's documents current again, as a new version.
    Rollback(outrider_control::cli::RollbackArgs),
    /// Removes a document added with `apply`, as a new version; exits 1 if it is not in
    /// force, comes from the policy directory, or what remains would not validate.
    Delete(outrider_control::cli::DeleteArgs),
    /// Prints a workload's merged policy as YAML; exits 1 for a workload no document names
    /// and no proxy runs.
    Get(outrider_control::cli::GetArgs),
    /// Finds what is wrong (NACKs, misspelt workloads, unused or rejected documents, stale
    /// proxies, expiring certificates, clock skew), each with a fix; exits 0 (nothing), 1
    /// (errors) or 2 (warnings only).
    Check(outrider_control::cli::ReadArgs),
    /// Prints this CLI's version and the control plane's.
    Version(outrider_control::cli::ReadArgs),
    /// Prints the policy's JSON Schema (generated from the policy types; the same as
    /// deploy/schema/policy.json and as the control plane serves).
    Schema,
    /// Prints a shell completion script: `source <(outriderctl completion bash)`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// EX_USAGE: a flag or argument clap refuses (clap's own exit code would be 2).
const EX_USAGE: u8 = 64;

/// Runs the CLI (also `outrider-control` called as `outriderctl`).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // `--help` and `--version` are not errors: they print to stdout and exit 0.
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    match cli.command {
        Command::Validate(args) => outrider_control::validate::main(&args),
        Command::Inject(args) => outrider_control::inject::main(*args),
        Command::WaitReady(args) => outrider_control::wait::main(&args),
        Command::Apply(args) => outrider_control::cli::apply(args),
        Command::Status(args) => outrider_control::cli::status(args),
        Command::History(args) => outrider_control::cli::history(args),
        Command::Rollback(args) => outrider_control::cli::rollback(args),
        Command::Delete(args) => outrider_control::cli::delete(args),
        Command::Get(args) => outrider_control::cli::get(args),
        Command::Check(args) => outrider_control::cli::check(args),
        Command::Version(args) => outrider_control::cli::version(args),
        Command::Schema => {
            print!("{}", outrider_config::policy_schema_text());
            ExitCode::SUCCESS
        }
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "outriderctl",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
    }
}
