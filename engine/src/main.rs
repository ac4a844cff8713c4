//! The `distillery` binary: the CLI with the ops distillery ships.

fn main() -> std::process::ExitCode {
    distillery::main_with(distillery_ops::builtin())
}
