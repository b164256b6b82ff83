#!/usr/bin/env bash
# The device check (docs/benchmarks.md, "The device check"): one run on a GPU or TPU host that prints one table of
# the versions, the practical matmul rates, ViT-B/16's train step, the input feed, the default job's steady rate,
# the cached MoRA epoch, the reproduce command's measured rates and the HF-parity tests, in under 11 minutes (the time
# limits below sum to 645 s).
#   bash bench/device_check.sh [OUT]     # OUT: where each section's whole output goes (default ./device_check_out)
# The summary table goes to stdout and OUT/summary.md. Each section runs under its own time limit; one that fails
# or runs out of time says "failed (see FILE)" in its row, and the others still run. With a .device/wheels folder
# (../shared/tools/device_wheels.sh; docs/benchmarks.md) its wheels are installed first into /tmp/site.
set -uo pipefail

out=${1:-device_check_out}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
cores=$(nproc)
# Half the GPU's memory for jax leaves the other half to PyTorch (the parity tests' references).
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rows=()

# The last markdown table of a file, each data row as "header: value, ..." (n/a cells left out), rows joined by
# <br>: whatever columns the bench scripts print, their figures reach the summary with their names. Other lines
# between its rows (progress bars) are passed over: the table runs from its header to the next table's.
last_table() {
  awk -F'|' '
    function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
    /^\|[ \t]*:?---/ { header = n; next }
    /^\|/ { rows[++n] = $0 }
    END {
      if (!header) exit
      split(rows[header], head, "|")
      for (i = header + 1; i <= n; i++) {
        cells = split(rows[i], cell, "|"); line = ""
        for (j = 2; j < cells; j++) {
          value = trim(cell[j])
          if (value != "n/a") line = line (line == "" ? "" : ", ") trim(head[j]) ": " value
        }
        all = all (all == "" ? "" : "<br>") line
      }
      print all
    }' "$1"
}

last_line() {
  grep -v '^[[:space:]]*$' "$1" | tail -n 1 | cut -c 1-200
}

# section NAME LIMIT DIGEST COMMAND: runs COMMAND (bash) under a LIMIT-second timeout (its whole process group),
# its output in OUT/NAME.txt, and adds the table row: DIGEST of the output ("table", the "last" line, or
# "grep:REGEX", the matching lines joined by "; "), or on failure the last line (a traceback's error, pytest's
# counts).
section() {
  local name=$1 limit=$2 digest=$3 command=$4 file=$out/$1.txt begin result
  echo "\$ $command" > "$file"
  begin=$SECONDS
  timeout --kill-after=5 "$limit" bash -c "$command" >> "$file" 2>&1
  rc=$?  # global: the wheels' section decides PYTHONPATH by it
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    result="failed (see $name.txt): timed out after $limit s"
  elif [ "$rc" != 0 ]; then
    result="failed (see $name.txt): exit $rc: $(last_line "$file")"
  else
    case $digest in
      table) result=$(last_table "$file") ;;
      last) result=$(last_line "$file") ;;
      grep:*) result=$(grep -E "${digest#grep:}" "$file" | paste -s -d ';' | sed 's/;/; /g') ;;
    esac
    result=${result:-"ok, nothing to summarise (see $name.txt)"}
  fi
  rows+=("| $name | $limit | $((SECONDS - begin)) | ${result//|/\\|} |")
}

if [ -d .device/wheels ]; then
  section wheels 20 last "pip install -q --upgrade --no-index --no-deps --target /tmp/site .device/wheels/*.whl &&
    if ls .device/wheels/promise-*.tar.gz > /dev/null 2>&1; then pip install -q --upgrade --no-index --no-deps \
      --no-build-isolation --target /tmp/site .device/wheels/promise-*.tar.gz; fi &&
    echo installed \$(ls .device/wheels | wc -l) files of .device/wheels into /tmp/site"
  [ "$rc" = 0 ] && export PYTHONPATH=/tmp/site:$PYTHONPATH
else
  rows+=("| wheels | 0 | 0 | skipped: no .device/wheels folder |")
fi

section versions 25 last "python - <<'EOF'
import os, platform
from importlib import metadata
import jax

def version(package):
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return 'absent'

devices = jax.devices()
names = ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers', 'pytest')
packages = ', '.join(f'{name} {version(name)}' for name in names)
print(f'python {platform.python_version()}, {packages}; {len(devices)} x {devices[0].device_kind} '
      f'({devices[0].platform}), {len(os.sched_getaffinity(0))} cores')
EOF"
section peak 35 "grep:TFLOP/s" "python bench/peak.py"
section train 60 table "python bench/train.py --configs ViT-B/16 --batch 256 --dtype bfloat16 --no_peer \
  --peak_tflops auto"
section feed 45 table "python bench/feed.py --size 224 --workers 1 $cores --store"
section busy 60 table "python bench/feed.py --busy configs/easy_vqa_mora.py"
# The cached epoch alone: the uncached run's decoding would take most of the section's time.
section prefix_cache 100 "grep:^steady samples/s" "python bench/prefix_cache.py --configs ViT-B/16 --batch 256 \
  --dtype bfloat16 --cache_dtype auto --samples 4096 --data_threads $cores --eval_batch 256 --epochs 4 --no_peer \
  --no_uncached --whole_epochs --test_repeats 0"
# The rates `python -m mora_jax.reproduce --dry_run` measures on this host (its probes: MoRA's recipe uncached and
# cached, the prompt methods', the linear probe's), and the mora-peft table's time per run and in all from them.
section reproduce 180 "grep:^Left|mora-both70|dcp-both70" "python -m mora_jax.reproduce mora-peft --dry_run \
  --data_dir /tmp/none --workdir $out/reproduce && cat $out/reproduce/throughput.json"
# The tests that compare with transformers' outputs (the whole three files take about 3 minutes on an H200).
# pytest-xdist (pyproject's addopts) may be absent: one process. Optimizations on: the GPU's real kernels.
if python -c "import pytest" > /dev/null 2>&1; then
  section parity 120 last "JAX_DISABLE_MOST_OPTIMIZATIONS=0 OMP_NUM_THREADS=$cores python -m pytest -q -o addopts='' \
    -p no:cacheprovider -k 'parity or transformers' tests/test_models_hf.py tests/test_models_modeling.py \
    tests/test_models_llama.py"
else
  rows+=("| parity | 120 | 0 | not run: pytest is not importable on this host (add its wheels to .device/wheels) |")
fi

# The device's copy of the checkout may have no .git.
revision=$(git rev-parse --short HEAD 2> /dev/null) || revision="a checkout without git"
if git rev-parse --git-dir > /dev/null 2>&1 && ! git diff --quiet HEAD; then
  revision+=" with uncommitted changes"
fi
{
  echo "Device check of $revision, $(date -u '+%Y-%m-%d %H:%M UTC'), host $(hostname)"
  echo
  echo "| section | limit (s) | took (s) | result |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$out/summary.md"
