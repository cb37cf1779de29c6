#!/bin/bash
# The GPU check: one command on a machine with one NVIDIA GPU, run from the
# repository root, that ends in one table within 8 minutes:
#   (a) installs what the image lacks (grain, array-record, ml-collections,
#       clu, portpicker) from wheels carried in .whl/, into /tmp/site;
#   (b) the Pallas flash-attention kernel against its dense reference: bf16,
#       T = 512, 2048, 8192, 1 and 8 documents per row, forward and backward
#       (benchmarks/flash_check.py);
#   (c) the attention backends xla, cudnn and pallas, head dim 128, T = 2048
#       and 8192 (benchmarks/attention.py);
#   (d) the llama_109m train step (bf16, 16 x 2048 tokens) with each attention
#       backend, and the PyTorch peer (benchmarks/train_step.py);
#   (e) one table of all of it (benchmarks/gpu_summary.py).
# Each part has a time limit, so the table comes whatever a part does; logs and
# results.jsonl go to $OUT_DIR ($OUT where the device tool sets it).
#
#   bash benchmarks/gpu_check.sh wheels      # where pip reaches PyPI: fills .whl/ (~5 MB)
#   bash benchmarks/gpu_check.sh             # on the GPU machine, with .whl/ beside it
#   DRY_RUN=1 bash benchmarks/gpu_check.sh   # anywhere: checks every part, prints the commands
#
# Parameters, as environment variables: PYTHON (default python3), OUT_DIR,
# DRY_RUN=1. The image is expected to have jax with CUDA, flax, optax, orbax,
# torch and numpy (see README.md, "The GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
OUT_DIR=${OUT_DIR:-${OUT:-/tmp/maxlite-gpu-check}}
RESULTS=$OUT_DIR/results.jsonl
# Pure-Python or manylinux wheels for Python 3.12 that the GPU image lacks; the
# versions are those the tests run with.
WHEELS=(grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 clu==0.0.12 portpicker==1.6.0)

if [[ "${1:-}" == wheels ]]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
fi

PARTS=(benchmarks/flash_check.py benchmarks/attention.py benchmarks/train_step.py
       benchmarks/torch_peer.py benchmarks/gpu_summary.py configs/llama_109m.py)
TRAIN_STEP=(benchmarks/train_step.py --config=configs/llama_109m.py
            --config.model.max_seq_len=2048 --config.train.micro_batch_size=16
            --backends=xla,pallas,cudnn --steps=10 --windows=3 --side_timeout=75
            --results="$RESULTS")
# name, seconds allowed, command
STEPS=(
  "flash_check|100|$PYTHON benchmarks/flash_check.py --lengths=512,2048,8192 --results=$RESULTS"
  "attention|110|$PYTHON benchmarks/attention.py --head_dims=128 --lengths=2048,8192 --repeats=5 --results=$RESULTS"
  "train_step|230|$PYTHON ${TRAIN_STEP[*]}"
)

if [[ "$DRY_RUN" == 1 ]]; then
  # Every part exists and parses, the train-step config validates, and the
  # commands are printed; nothing runs on a device.
  status=0
  for part in "${PARTS[@]}"; do
    [[ -f "$part" ]] || { echo "missing: $part" >&2; status=1; }
  done
  "$PYTHON" -m py_compile "${PARTS[@]}" || status=1
  for script in benchmarks/flash_check.py benchmarks/attention.py benchmarks/gpu_summary.py; do
    "$PYTHON" "$script" --help > /dev/null || { echo "no --help: $script" >&2; status=1; }
  done
  "$PYTHON" "${TRAIN_STEP[@]}" --dry_run || status=1
  echo "+ $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name seconds command <<< "$step"
    echo "+ timeout $seconds $command"
  done
  echo "+ $PYTHON benchmarks/gpu_summary.py $RESULTS"
  exit $status
fi

mkdir -p "$OUT_DIR"
: > "$RESULTS"
if compgen -G '.whl/*.whl' > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "error: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | \
    tee "$OUT_DIR/gpu.txt"
"$PYTHON" -c 'import jax, jaxlib, torch; print("jax", jax.__version__, "jaxlib", jaxlib.__version__,
"torch", torch.__version__, jax.devices())' 2>&1 | tee "$OUT_DIR/versions.txt"

for step in "${STEPS[@]}"; do
  IFS='|' read -r name seconds command <<< "$step"
  echo "== $name (at most ${seconds}s): $command"
  start=$SECONDS
  timeout --kill-after=10 "$seconds" $command > "$OUT_DIR/$name.log" 2>&1
  code=$?
  grep -E '^\||^device|^[0-9]+ layers' "$OUT_DIR/$name.log"
  echo "== $name: exit $code after $((SECONDS - start))s$( ((code == 124)) && echo ' (time limit)')"
done
echo
"$PYTHON" benchmarks/gpu_summary.py "$RESULTS"
