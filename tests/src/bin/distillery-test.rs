//! The `distillery` CLI with the test ops registered beside the real ones.

#[global_allocator]
static ALLOCATOR: distillery_ops::runtime::HugePageAlloc = distillery_ops::runtime::HugePageAlloc;

fn main() -> std::process::ExitCode {
    distillery_ops::runtime::tune_allocator();
    distillery::main_with(distillery_tests::registry())
}
