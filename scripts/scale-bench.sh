#!/usr/bin/env bash
# A forward pass, calibrate and one distillation at a real model's width, without its weights:
# benches/scale.toml writes a model of CONFIG (recipes/configs/<CONFIG>) with random weights
# (`init`, its first LAYERS layers), width-prunes it to HIDDEN / FFN, and runs each measured step
# in a process of its own. Per step it prints the wall time, peak host memory (/usr/bin/time -v),
# peak GPU memory (nvidia-smi, polled every 100 ms, when there is a GPU), tokens/s and the model
# FLOPs utilization against PEAK_TFLOPS, beside what `plan --estimate` expects.
#
#   scripts/scale-bench.sh                        the 1B-class defaults, on this machine's build
#   CONFIG=llama-3.1-8b LAYERS=2 SEQ=8192 HIDDEN=3072 FFN=9216 BIN=path/to/distillery \
#     PEAK_TFLOPS=989 scripts/scale-bench.sh      the first layers of Llama-3.1-8B on an H200
#
# Environment: CONFIG (llama-3.2-1b), LAYERS (2), SEQ (512), HIDDEN (1536), FFN (6144),
# GLOBAL_BATCH (2, the distillation's sequences per step; it runs two steps), COMPUTE (float32),
# BIN (default: builds target/release/distillery), PEAK_TFLOPS (the device's dense peak for the
# compute dtype; default 989, an H100/H200's bf16; a CPU's is far lower, so its MFU reads ~0).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
config="${CONFIG:-llama-3.2-1b}"
layers="${LAYERS:-2}"
seq="${SEQ:-512}"
hidden="${HIDDEN:-1536}"
ffn="${FFN:-6144}"
global="${GLOBAL_BATCH:-2}"
compute="${COMPUTE:-float32}"
peak="${PEAK_TFLOPS:-989}"
[ -d "recipes/configs/$config" ] || { echo "error: no recipes/configs/$config (CONFIG names a directory there)" >&2; exit 2; }
if [ -z "${BIN:-}" ]; then
  cargo build --release -p distillery
  BIN="$root/target/release/distillery"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export DISTILLERY_CACHE="$work/cache" SCALE_DATA="$work/data"
mkdir -p "$SCALE_DATA"
# Text enough for every step: the byte-level tokenizer makes one token of each byte.
python3 - "$SCALE_DATA/text.txt" "$(( (global * 2 + 2) * (seq + 1) + 4 * seq ))" <<'EOF'
import random, sys
random.seed(0)
words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
out, n = [], 0
while n < int(sys.argv[2]):
    line = " ".join(random.choice(words) for _ in range(12)) + ".\n"
    out.append(line); n += len(line)
open(sys.argv[1], "w").write("".join(out))
EOF
cp benches/scale.toml "$work/scale.toml"
sed -i "s|\.\./recipes/configs/llama-3.2-1b|$root/recipes/configs/$config|" "$work/scale.toml"
recipe="$work/scale.toml"
sets=(
  --set "steps.model.params.num_layers=$layers"
  --set "steps.forward.params.window=$seq" --set "steps.forward.params.max_tokens=$((2 * seq))"
  --set "steps.stats.params.seq_len=$seq"
  --set "steps.pruned.params.hidden_size=$hidden" --set "steps.pruned.params.intermediate_size=$ffn"
  --set "steps.distilled.params.seq_len=$seq" --set "steps.distilled.params.global_batch=$global"
  --set "steps.distilled.params.tokens=$((2 * global * seq))"
)
for s in forward stats distilled; do sets+=(--set "steps.$s.params.compute=$compute"); done
"$BIN" plan "$recipe" "${sets[@]}" --estimate --json > "$work/estimate.json"
"$BIN" run "$recipe" "${sets[@]}" --until pruned > "$work/prepare.log" 2>&1 || { cat "$work/prepare.log"; exit 1; }
gpu=0
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && gpu=1

measure() { # step, tokens it processes
  local step=$1 tokens=$2 poll=""
  if [ "$gpu" = 1 ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$work/$step.gpu" &
    poll=$!
  fi
  local timer=()
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)
  if ! "${timer[@]}" "$BIN" run "$recipe" "${sets[@]}" --until "$step" --force "$step" > "$work/$step.log" 2>&1; then
    [ -n "$poll" ] && kill "$poll"
    tail -30 "$work/$step.log"
    exit 1
  fi
  [ -n "$poll" ] && kill "$poll" && wait "$poll" 2>/dev/null || true
  "$BIN" show "$recipe" "${sets[@]}" "$step" --json > "$work/$step.show" 2>/dev/null || echo '{}' > "$work/$step.show"
  python3 - "$work" "$step" "$tokens" "$peak" <<'EOF'
import json, os, re, sys
work, step, tokens, peak = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
log = open(f"{work}/{step}.log").read()
m = re.search(rf"finished {step} in ([0-9.]+)s", log)
secs = float(m.group(1)) if m else float("nan")
m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
rss = int(m.group(1)) * 1024 / 1e9 if m else float("nan")
gpu = float("nan")
if os.path.exists(f"{work}/{step}.gpu"):
    vals = [float(l) for l in open(f"{work}/{step}.gpu") if l.strip().replace(".", "").isdigit()]
    gpu = max(vals) * 1024 * 1024 / 1e9 if vals else float("nan")
est = next(r for r in json.load(open(f"{work}/estimate.json")) if r["step"] == step)["estimate"]
flops, expect = est.get("flops", 0.0), est.get("memory_bytes", 0.0) / 1e9
per_s = tokens / secs
try:
    path = json.load(open(f"{work}/{step}.show"))["path"]
    train = json.load(open(os.path.join(path, "train.json")))
    per_s = train["tokens_per_second_this_run"]
    what = "tokens/s (training loop)"
except Exception:
    what = "tokens/s (whole step)"
mfu = per_s * flops / tokens / (peak * 1e12) if tokens and flops else float("nan")
print(f"{step:<10} {secs:8.1f} s  host {rss:7.2f} GB  gpu {gpu:7.2f} GB  (estimate {expect:7.2f} GB)  {per_s:10.1f} {what}  MFU {100 * mfu:5.1f}%")
EOF
}
echo "== $config, first $layers layers, sequence $seq, student hidden $hidden / ffn $ffn, compute $compute ($BIN)"
measure forward $((2 * seq))
measure stats $((4 * seq))
measure distilled $((2 * global * seq))
