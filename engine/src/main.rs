//! The `distillery` binary: the CLI with the ops distillery ships.

#[global_allocator]
static ALLOCATOR: distillery_ops::runtime::HugePageAlloc = distillery_ops::runtime::HugePageAlloc;

fn main() -> std::process::ExitCode {
    distillery_ops::runtime::tune_allocator();
    distillery::main_with(distillery_ops::builtin())
}
