//! The `dinod` binary: all logic lives in the `actors` crate.

fn main() {
    std::process::exit(actors::cli::main());
}
