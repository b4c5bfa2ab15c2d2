#!/usr/bin/env bash
# Builds every CUDA test binary and the benchmark examples here (no GPU needed) and packs them,
# stripped and xz-compressed, into .carry/bin/ (or $CARRY/bin/) for the GPU machine (see scripts/gpu-run.sh).
# Only the root crate's test binaries travel (the models' tests are CPU tests), to stay under the
# 64 MiB a run may carry.
# Usage: [CARRY=DIR] scripts/pack-gpu.sh [example ...]   (default examples: bench_attention;
# default CARRY: .carry; another folder lets several checkouts pack side by side)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/install-cuda-toolkit.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
examples=("${@:-bench_attention}")
carry="${CARRY:-.carry}"

rm -rf "$carry"/bin
mkdir -p "$carry"/bin
cargo test --workspace --release --features cuda --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if (m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]
            and "candle-sparse-models" not in m["package_id"]):
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  cp "$exe" "$carry/bin/test-$name"
done
# Copy each example from its hashed artifact path (the unhashed copy in release/examples/ is shared
# by every checkout using the same target folder).
for ex in "${examples[@]}"; do
  exe=$(cargo build --release --features cuda --example "$ex" --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])
' "$ex")
  [ -n "$exe" ] || { echo "pack-gpu: example $ex did not build" >&2; exit 1; }
  cp "$exe" "$carry/bin/$ex"
done
cp examples/*.py "$carry"/bin/
strip "$carry"/bin/test-* "${examples[@]/#/$carry/bin/}"
xz -T0 -6 "$carry"/bin/test-* "${examples[@]/#/$carry/bin/}"
du -sh "$carry"/bin
ls "$carry"/bin
