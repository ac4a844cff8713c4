#!/usr/bin/env bash
# The GPU checks, in two halves, because the GPU machine reaches no registry and cannot build:
#
#   scripts/gpu-check.sh build   here: builds the CUDA kernel tests, the kernel benchmark and the
#                                CUDA `distillery` into gpu-bin/ (name it in the device run's carry)
#   scripts/gpu-check.sh run     on the GPU machine: runs them and prints their figures
#
# FEATURE=wgpu does the same on wgpu (lavapipe here), which checks this script without a GPU
# (the at-scale runs are for CUDA only, unless SCALE=1).
# Bench sizes: TOKENS, VOCAB, REPS (see kernels/benches/cube.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
feature="${FEATURE:-cuda}"
bin=gpu-bin

executable() { # cargo's JSON messages on stdin -> the path of the built test or bench executable
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] in (["test"], ["bench"]):
        print(m["executable"])' | tail -1
}

case "${1:-}" in
build)
  mkdir -p "$bin"
  cargo build --release -p distillery --features "$feature"
  cp target/release/distillery "$bin/distillery"
  cp "$(cargo test --release -p distillery-kernels --features "$feature" --test cube --no-run \
        --message-format=json 2>/dev/null | executable)" "$bin/kernel-tests"
  cp "$(cargo bench -p distillery-kernels --features "$feature" --bench cube --no-run \
        --message-format=json 2>/dev/null | executable)" "$bin/kernel-bench"
  strip "$bin"/* 2>/dev/null || true
  # Packed: the three executables together pass the device run's 64 MiB carry only compressed.
  tar -C "$bin" -czf "$bin/executables.tar.gz" distillery kernel-tests kernel-bench
  rm "$bin/distillery" "$bin/kernel-tests" "$bin/kernel-bench"
  echo "$feature" > "$bin/FEATURE"
  du -sh "$bin"/*
  ;;
run)
  [ -f "$bin/executables.tar.gz" ] || { echo "no $bin/: run 'scripts/gpu-check.sh build' first and carry $bin" >&2; exit 2; }
  unpacked="$(mktemp -d)"
  tar -C "$unpacked" -xzf "$bin/executables.tar.gz"
  cp "$bin/FEATURE" "$unpacked/FEATURE"
  bin="$unpacked"
  echo "== device"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  echo "== kernel tests against their references ($(cat "$bin/FEATURE"))"
  DISTILLERY_REQUIRE_GPU=1 "$bin/kernel-tests" --test-threads 1
  echo "== kernel benchmark"
  "$bin/kernel-bench"
  echo "== the method on a tiny model, every op on the GPU backend"
  work="$(mktemp -d)"
  mkdir -p "$work/model" "$work/data"
  cp tests/golden/llama-gqa-tied-f32/* "$work/model/"
  cp tests/golden/char-tokenizer.json "$work/model/tokenizer.json"
  for i in $(seq 0 299); do
    echo "Line $i: the quick brown fox jumps over the lazy dog, $((i * 7 % 13)) times."
  done > "$work/data/train.txt"
  cp tests/gpu/tiny.toml "$work/r.toml"
  DISTILLERY_CACHE="$work/cache" "$bin/distillery" run "$work/r.toml"
  DISTILLERY_CACHE="$work/cache" "$bin/distillery" show "$work/r.toml" table
  DISTILLERY_CACHE="$work/cache" "$bin/distillery" show "$work/r.toml" distilled
  if [ "$(cat "$bin/FEATURE")" = cuda ]; then
    # wgpu has no bf16; on CUDA the same recipe again with bf16 matmuls (f32 master weights).
    echo "== the same with compute = bfloat16"
    bf16=()
    for s in stats distilled eval_teacher eval_pruned eval_distilled; do
      bf16+=(--set "steps.$s.params.compute=bfloat16")
    done
    DISTILLERY_CACHE="$work/cache" "$bin/distillery" run "$work/r.toml" "${bf16[@]}"
    DISTILLERY_CACHE="$work/cache" "$bin/distillery" show "$work/r.toml" table "${bf16[@]}"
  fi
  echo "== few-shot and generation (KV cache) against lm-evaluation-harness's golden"
  sed "s|ROOT|$PWD|g" tests/gpu/harness.toml > "$work/h.toml"
  DISTILLERY_CACHE="$work/cache" "$bin/distillery" run "$work/h.toml"
  for s in mc gen; do
    DISTILLERY_CACHE="$work/cache" "$bin/distillery" show "$work/h.toml" "$s" --json > "$work/$s.json"
  done
  python3 tests/gpu/check_harness_golden.py "$work/mc.json" "$work/gen.json"
  if [ "$(cat "$bin/FEATURE")" = cuda ]; then
    # Data-parallel training's NCCL path, with the ranks this machine has GPUs for (one NCCL rank
    # with one GPU: DISTILLERY_COLLECTIVE=nccl makes even a single rank go through every
    # collective, reduce-scatter and all-gather included).
    echo "== distillation through NCCL"
    gpus="$(nvidia-smi --list-gpus 2>/dev/null | wc -l)"
    ldconfig -p 2>/dev/null | grep -q libnccl || echo "note: no libnccl in the loader's cache; NCCL will fail to load"
    if [ "${gpus:-0}" -ge 2 ]; then tasks=2; else tasks=1; fi
    DISTILLERY_COLLECTIVE=nccl DISTILLERY_CACHE="$work/cache" "$bin/distillery" run "$work/r.toml" \
      --set steps.distilled.resources.tasks=$tasks --force distilled
    DISTILLERY_CACHE="$work/cache" "$bin/distillery" show "$work/r.toml" distilled \
      --set steps.distilled.resources.tasks=$tasks
  fi
  rm -rf "$work"
  scale_default=0
  [ "$(cat "$bin/FEATURE")" = cuda ] && scale_default=1
  if [ "${SCALE:-$scale_default}" = 1 ]; then
    # Real widths without real weights (scripts/scale-bench.sh): a 1B-class Llama whole, and the
    # first two layers of Llama-3.1-8B and Mistral-NeMo-12B at sequence 8192, each distilled into
    # its published width-pruned shape. SCALE=0 skips this (and is the default off CUDA).
    compute=float32
    [ "$(cat "$bin/FEATURE")" = cuda ] && compute=bfloat16
    echo "== at scale, random weights (compute $compute)"
    BIN="$bin/distillery" COMPUTE=$compute CONFIG=llama-3.2-1b LAYERS=16 SEQ=2048 HIDDEN=1536 FFN=6144 \
      scripts/scale-bench.sh
    BIN="$bin/distillery" COMPUTE=$compute CONFIG=llama-3.1-8b LAYERS=2 SEQ=8192 HIDDEN=3072 FFN=9216 \
      scripts/scale-bench.sh
    BIN="$bin/distillery" COMPUTE=$compute CONFIG=mistral-nemo-12b LAYERS=2 SEQ=8192 HIDDEN=4096 FFN=11520 \
      scripts/scale-bench.sh
  fi
  ;;
*)
  sed -n '2,10p' "$0" >&2
  exit 2
  ;;
esac
