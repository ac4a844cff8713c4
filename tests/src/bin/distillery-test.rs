//! The `distillery` CLI with the test ops registered beside the real ones.

fn main() -> std::process::ExitCode {
    distillery::main_with(distillery_tests::registry())
}
