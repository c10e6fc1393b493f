#!/usr/bin/env bash
# The GPU check: one prepared run of at most 8 minutes on a machine with a CUDA GPU, no internet,
# its own CUDA torch, and vtcbench's pure-Python dependencies brought along as wheels.
#
#   here (PyPI reachable):  bash benchmarks/gpu_check.sh --fetch-wheels   # into .whl/ (git-ignored)
#   there (the GPU):        bash benchmarks/gpu_check.sh                  # prints one summary
#
# It runs, each under its own time limit: the engine's invariants in bfloat16 under sdpa and
# flash_attention_2 where installed (tests/test_gpu.py; with two GPUs visible, also a model split
# over both by --device-map against the same model on one); benchmarks/flops_to_time.py at the full
# 7B width with random weights (fp16); and `vtcbench profile` of vanilla, fastv and pdrop on
# llava-1.5-7b's architecture with random weights (bf16, sdpa). Logs and JSON go to $OUT (or
# gpu-check/), the summary to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
# vtcbench's imports that a CUDA image with torch and transformers' usual companions may lack, at
# the versions of requirements/lock.txt (Python 3.12 wheels; --no-deps: each need is named here).
WHEELS=(transformers tokenizers huggingface_hub safetensors fvcore iopath yacs termcolor typer rich shellingham)

if [ "${1:-}" = "--fetch-wheels" ]; then
  rm -rf .whl && mkdir .whl
  for name in "${WHEELS[@]}"; do
    pin=$(grep -i "^${name//_/[-_]}==" requirements/lock.txt) || { echo "$name is not in requirements/lock.txt"; exit 1; }
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pin" 2>/dev/null || python3 -m pip wheel -q --no-deps -w .whl "$pin" || exit 1  # sdist only: build
  done
  grep -qxF /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  ls .whl
  exit 0
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vtcbench-site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/vtcbench-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")' || exit 1

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, record the status
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - started)) s" | tee -a "$out/steps.txt"
}

: >"$out/steps.txt"
step invariants 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
step flops_to_time 150 python3 benchmarks/flops_to_time.py --iterations 10
for method in vanilla fastv pdrop; do
  step "profile_$method" 90 python3 -m vtcbench.cli profile --method "$method" --model llava-1.5-7b --random-weights \
    --dtype bfloat16 --attn sdpa --new-tokens 32 --iterations 10 --format json
done

python3 - "$out" <<'PY'
import json, pathlib, shutil, subprocess, sys
out = pathlib.Path(sys.argv[1])
import torch, transformers
print(f"\n== vtcbench GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, CUDA {torch.version.cuda}, driver " + (subprocess.run(
          ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
      ).stdout.strip() if shutil.which("nvidia-smi") else "unknown"))
print((out / "steps.txt").read_text().rstrip())
tail = (out / "invariants.log").read_text().strip().splitlines()
print("invariants:", tail[-1] if tail else "(no output)")
print("flops_to_time:\n" + "\n".join("  " + line for line in (out / "flops_to_time.log").read_text().splitlines()[-6:]))
print(f"{'profile':<9} {'prefill ms':>10} {'ttft ms':>8} {'decode ms/tok':>13} {'KV MiB':>7} {'peak GiB':>8} {'J/sample':>8} "
      f"{'TFLOPs img':>10} {'fvcore/dispatch':>15}")
for method in ("vanilla", "fastv", "pdrop"):
    lines = [line for line in (out / f"profile_{method}.log").read_text().splitlines() if line.startswith("{")]
    if not lines:
        print(f"{method:<9} failed (see profile_{method}.log)")
        continue
    record = json.loads(lines[-1])
    latency, memory, energy = record["latency_ms"], record["memory"], record["energy"]
    fvcore = record["fvcore"]["language_model_macs"]
    agreement = f"{fvcore / record['opcount']['language_model_macs']:.4f}" if fvcore else "n/a"
    joules = energy["joules_per_sample"]
    print(f"{method:<9} {latency['llm_prefill']['median_ms']:>10.2f} {latency['ttft']['median_ms']:>8.2f} "
          f"{latency['decode_per_token']['median_ms']:>13.2f} {memory['kv_cache_bytes'] / 2**20:>7.1f} "
          f"{(memory['torch_max_allocated_bytes'] or 0) / 2**30:>8.2f} {joules if joules is None else round(joules, 2)!s:>8} "
          f"{record['flops']['tflops_image']:>10.3f} {agreement:>15}")
PY
