use clap::Parser;

fn main() -> std::process::ExitCode {
    // git runs a node's reference-transaction hook, a link to this program, by that name.
    if let Some(code) = gitfleet::node::hook::run_as_hook() {
        return code;
    }
    gitfleet::cli::main(gitfleet::cli::Cli::parse())
}
