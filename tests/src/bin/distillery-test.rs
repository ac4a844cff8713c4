//! The `distillery` CLI with the test ops registered beside the real ones.

fn main() -> std::process::ExitCode {
    distillery_ops::runtime::tune_allocator();
    distillery::main_with(distillery_tests::registry())
}
