//! The `distillery` binary: the CLI with the ops distillery ships.

fn main() -> std::process::ExitCode {
    distillery_ops::runtime::tune_allocator();
    distillery::main_with(distillery_ops::builtin())
}
