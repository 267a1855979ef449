#!/usr/bin/env bash
# Every benchmark of bench/ on an accelerator host, in under 5 minutes, into one JSON report.
#
#   bash bench/accelerator.sh [OUT_DIR]        # default: $OUT, else bench_results
#
# Each run has its own time limit and a failed or timed-out run is recorded as such, so the
# report is always written: OUT_DIR/report.json (plus each run's JSON, log and a profiler
# trace of the batch-512 step under OUT_DIR/trace_512).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench_results}}"
mkdir -p "$out"
big="--config configs/default.py --config.data.source_batch=512 --config.data.target_batch=512"

run() {  # run NAME SECONDS COMMAND...: its JSON goes to OUT/NAME.json, its output to NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local code=$?
  echo "$name: exit $code in $((SECONDS - start)) s"
  echo "{\"exit_code\": $code, \"seconds\": $((SECONDS - start))}" > "$out/$name.status.json"
}

python -c "import jax, json; d = jax.devices(); print(json.dumps({'platform': d[0].platform, \
'device_kind': d[0].device_kind, 'device_count': len(d), 'jax': jax.__version__}))" \
  > "$out/environment.json" 2> "$out/environment.log"
devices=$(python -c "import jax; n = jax.device_count(); \
print(','.join(str(k) for k in (1, 2, 4, 8) if k <= n))" 2>/dev/null || echo 1)

# The dual-encoder default at batch 512, then its structural loss in one block (the memory
# and speed trade-off of loss.struct_block_mb), bfloat16 encoders, and a large batch.
run train_step_512 60 python bench/train_step.py $big --steps=20 \
  --json="$out/train_step_512.json" --profile="$out/trace_512"
run train_step_512_one_block 40 python bench/train_step.py $big --steps=20 \
  --config.loss.struct_block_mb=0 --json="$out/train_step_512_one_block.json"
run train_step_512_bf16 40 python bench/train_step.py $big --steps=20 \
  --config.model.compute_dtype=bfloat16 --json="$out/train_step_512_bf16.json"
run train_step_4096 50 python bench/train_step.py --config configs/default.py --steps=10 \
  --config.data.source_batch=4096 --config.data.target_batch=4096 \
  --config.loss.struct_block_mb=256 --json="$out/train_step_4096.json"
run eval_scoring 50 python bench/eval_scoring.py --saf_images=1000 --repeats=3 \
  --json="$out/eval_scoring.json"
run scaling 45 python bench/scaling.py --devices="$devices" --steps=10 \
  --json="$out/scaling.json" -- $big

python - "$out" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
report = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
  name = os.path.basename(path)[:-len(".json")]
  if name != "report":
    with open(path) as f:
      report[name] = json.load(f)
with open(os.path.join(out, "report.json"), "w") as f:
  json.dump(report, f, indent=1)
print(f"wrote {os.path.join(out, 'report.json')}")
EOF
