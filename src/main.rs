use clap::Parser;

fn main() -> std::process::ExitCode {
    gitfleet::cli::main(gitfleet::cli::Cli::parse())
}
