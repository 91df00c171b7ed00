//! `purgatory-sync`: the engine from the command line.
//!
//! * `purgatory-sync demo` builds a scenario on loopback git servers it starts itself and shows
//!   the engine releasing events across them (the README's first command).
//! * `purgatory-sync run --manifest FILE` syncs the waiting events a manifest lists (plain
//!   events or raw NIP-34 events), printing one JSON line per outcome.
//!
//! Logging goes to stderr through `env_logger` (`RUST_LOG=debug` shows the engine's decisions).

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod demo;
mod knobs;
mod manifest;
mod progress;
mod run;
mod serve;

/// Fetches missing git data for events waiting in a GRASP relay's purgatory.
#[derive(Debug, Parser)]
#[command(name = "purgatory-sync", version, about, long_about = None, after_help = run::EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Starts git servers on loopback addresses and shows the engine syncing events from them.
    Demo(demo::DemoArgs),
    /// Syncs the waiting events listed in a manifest; one JSON line per outcome on stdout.
    Run(Box<run::RunArgs>),
    /// Prints a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Prints the manual page (roff) on stdout: `purgatory-sync man | man -l -`.
    Man,
}

fn main() -> ExitCode {
    // Usage errors exit with 2 (clap's own), --help and --version with 0.
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Demo(args) => demo::main(args),
        Command::Run(args) => run::main(*args),
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(
                shell,
                &mut command,
                "purgatory-sync",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => {
            let page = clap_mangen::Man::new(Cli::command());
            match page.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("purgatory-sync man: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
