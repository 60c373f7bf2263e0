#!/usr/bin/env bash
# The GPU path end to end, in one prepared run on an NVIDIA machine (about 10 minutes):
#
#   1. .venv with the .[gpu] extra (TensorRT, pycuda), unless it is already there;
#   2. the production model (configs/production.toml's model.path if it names a checkpoint, else the
#      shipped nano checkpoint) exported to ONNX at the production strip (`sortline export`: checked
#      against torch);
#   3. the FP16 engine built on GPU model.device (`sortline build-engine`);
#   4. the engine against ONNX Runtime on the same held-out strips (share of pixels of the same class),
#      and timed: strips/s and p99 against the belt's need at 3 m/s (benchmarks/tensorrt.py);
#   5. `sortline hil` on the production twin at 3 m/s on TensorRT, if the twin config exists;
#   6. one report: OUTDIR/report.json (flat) and OUTDIR/report.txt, beside each step's log.
#
#   bash benchmarks/gpu_check.sh OUTDIR [TWIN_CONFIG] [--cpu-only] [--quick]
#
# TWIN_CONFIG defaults to configs/production-twin.toml. It stops at the first step that fails, saying
# which and where its log is. --cpu-only runs every step that needs no GPU (the export, ONNX Runtime
# on the held-out strips; hil, if the twin exists, on the CPU fallback for a few seconds, its timing
# not judged) on any machine: the dry run of this script. --quick: shorter timings and hil run.
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [TWIN_CONFIG] [--cpu-only] [--quick]" >&2; exit 2; }
CPU_ONLY=0 QUICK=0 ARGS=()
for a in "$@"; do
  case "$a" in
    --cpu-only) CPU_ONLY=1 ;;
    --quick) QUICK=1 ;;
    -*) usage ;;
    *) ARGS+=("$a") ;;
  esac
done
[ "${#ARGS[@]}" -ge 1 ] && [ "${#ARGS[@]}" -le 2 ] || usage
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "${ARGS[0]}"
OUT="$(cd "${ARGS[0]}" && pwd)"
TWIN="${ARGS[1]:-configs/production-twin.toml}"
PROD="configs/production.toml"
cd "$ROOT"
PY=.venv/bin/python
SL=.venv/bin/sortline
STEP="start" LOG="$OUT/gpu_check.log"
trap 'echo "gpu_check: FAILED at step \"$STEP\" (exit $?); its log: $LOG" >&2; echo "step=$STEP failed" >> "$OUT/steps.txt"' ERR
: > "$OUT/steps.txt"

step() {   # step NAME LOGFILE: what follows runs as that step, its output in LOGFILE
  STEP="$1" LOG="$OUT/$2"
  echo "== $STEP (log: $LOG)"
}
done_step() { echo "step=$STEP ok ${1:-}" >> "$OUT/steps.txt"; }

step "venv" venv.log
make .venv/.sortline-installed > "$LOG" 2>&1
if [ "$CPU_ONLY" = 0 ]; then
  if ! $PY -c "import tensorrt, pycuda" >> "$LOG" 2>&1; then
    $PY -m pip install -e '.[gpu]' >> "$LOG" 2>&1
  fi
  $PY -c "import tensorrt, pycuda.driver as d; d.init(); print('TensorRT', tensorrt.__version__, '-', d.Device.count(), 'GPU(s)')" \
    >> "$LOG" 2>&1
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv >> "$LOG" 2>&1
  fi
fi
tail -n 3 "$LOG"
done_step

step "model" model.log
# The checkpoint the production config names, or the shipped nano one while it names none.
$PY - "$PROD" > "$OUT/model.txt" 2> "$LOG" <<'EOF'
import sys
from pathlib import Path
from sortline.pipeline.graph import load_config

config = Path(sys.argv[1])
settings = load_config(config)
path = settings.model.path
if path.endswith(".safetensors"):
    print(path if path.startswith("shipped:") else (config.parent / path).resolve())
else:
    print("shipped:belt-fusion-nano.safetensors")
print(settings.model.device)
EOF
MODEL="$(sed -n 1p "$OUT/model.txt")" DEVICE="$(sed -n 2p "$OUT/model.txt")"
echo "model $MODEL, GPU $DEVICE" | tee -a "$LOG"
done_step "model=$MODEL device=$DEVICE"

step "export" export.log
$SL export "$MODEL" --config "$PROD" --out "$OUT/model.onnx" > "$LOG" 2>&1
cat "$LOG"
done_step

BENCH=(--config "$PROD" --model "$MODEL" --onnx "$OUT/model.onnx" --workdir "$OUT" --json "$OUT/tensorrt.json")
if [ "$QUICK" = 1 ]; then BENCH+=(--quick); fi
if [ "$CPU_ONLY" = 0 ]; then
  step "build-engine" build-engine.log
  $SL build-engine "$OUT/model.onnx" --out "$OUT/model-fp16.engine" --device "$DEVICE" > "$LOG" 2>&1
  cat "$LOG"
  done_step

  step "tensorrt vs onnxruntime" tensorrt.log
  $PY benchmarks/tensorrt.py "${BENCH[@]}" --engine "$OUT/model-fp16.engine" 2>&1 | tee "$LOG"
  done_step
else
  step "onnxruntime (cpu only)" tensorrt.log
  $PY benchmarks/tensorrt.py "${BENCH[@]}" --cpu-only 2>&1 | tee "$LOG"
  done_step
fi

if [ -f "$TWIN" ]; then
  step "hil" hil.log
  HIL_SECONDS=60
  if [ "$QUICK" = 1 ]; then HIL_SECONDS=15; fi
  if [ "$CPU_ONLY" = 0 ]; then
    SORTLINE_MODEL__BACKEND=tensorrt SORTLINE_MODEL__PATH="$OUT/model-fp16.engine" \
      $SL hil --config "$TWIN" --speed 3 --seconds "$HIL_SECONDS" --out "$OUT/hil" --json "$OUT/hil.json" > "$LOG" 2>&1
  else   # the CPU fallback cannot keep pace with the production strip: exit 1 (over budget) is no failure here
    rc=0
    SORTLINE_MODEL__BACKEND=tensorrt SORTLINE_MODEL__PATH="$OUT/model.onnx" \
      $SL hil --config "$TWIN" --speed 3 --seconds 5 --out "$OUT/hil" --json "$OUT/hil.json" > "$LOG" 2>&1 || rc=$?
    [ "$rc" -le 1 ] || { echo "hil exit $rc" >> "$LOG"; false; }
  fi
  tail -n 20 "$LOG"
  done_step
else
  echo "== hil: skipped, no $TWIN" | tee "$OUT/hil.log"
  echo "step=hil skipped no $TWIN" >> "$OUT/steps.txt"
fi

step "report" report.log
$PY - "$OUT" "$CPU_ONLY" > "$LOG" 2>&1 <<'EOF'
import json, re, sys
from pathlib import Path

out, cpu_only = Path(sys.argv[1]), sys.argv[2] == "1"
report = {"cpu_only": cpu_only}
export = (out / "export.log").read_text()
m = re.search(r"max abs difference in confidence ([0-9.e+-]+), classes agree on ([0-9.]+) %", export)
report.update({"export_onnx_mb": round((out / "model.onnx").stat().st_size / 1e6, 2),
               "export_vs_torch_max_confidence_diff": float(m[1]), "export_vs_torch_class_agreement": float(m[2]) / 100})
report.update(json.loads((out / "tensorrt.json").read_text()))
if (out / "hil.json").exists():
    hil = json.loads((out / "hil.json").read_text())
    report.update({f"hil_{k}": v for k, v in hil.items() if isinstance(v, (int, float, str, bool)) or v is None})
report["steps"] = (out / "steps.txt").read_text().split("\n")[:-1]
(out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
lines = [f"GPU check{' (CPU only: no TensorRT step run)' if cpu_only else ''}: {out}", ""]
lines += [f"{k}: {v}" for k, v in report.items() if k != "steps"]
lines += ["", "steps:"] + [f"  {s}" for s in report["steps"]]
(out / "report.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
cat "$LOG"
echo "gpu_check: done; report in $OUT/report.json and $OUT/report.txt"
