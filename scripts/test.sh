#!/usr/bin/env bash
# The test suite: every test on the CPU, then a type-check of the GPU features.
# One target directory, one build: `cargo check` of the features reuses the dependency graph.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=default
[ -n "${CI:-}" ] && profile=ci

if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --profile "$profile" "$@"
else
  echo "cargo-nextest not found; falling back to cargo test" >&2
  cargo test --workspace "$@"
fi
cargo test --workspace --doc
# The benchmarks must keep compiling: built in the test profile (the dependencies above), not run.
cargo test --workspace --benches --no-run

# The CubeCL kernels against their references on wgpu: a software Vulkan (lavapipe) is enough.
# Without an adapter the kernel tests say so and pass, unless DISTILLERY_REQUIRE_GPU=1 (CI).
cargo nextest run -p distillery-kernels --features wgpu --profile "$profile" --test cube

# The GPU builds of the whole tool must keep compiling.
cargo check -p distillery --features cuda
cargo check -p distillery --features wgpu
