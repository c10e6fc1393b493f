#!/usr/bin/env bash
# The GPU check: one prepared run of at most 10 minutes (about 5 on an H200) on a machine with a
# CUDA GPU, no internet, its own CUDA torch, and vtcbench's pure-Python dependencies brought along
# as wheels.
#
#   here (PyPI reachable):  bash benchmarks/gpu_check.sh --fetch-wheels   # into .whl/ (git-ignored)
#   there (the GPU):        bash benchmarks/gpu_check.sh                  # prints one summary
#
# It runs, each under its own time limit, the most telling first: the engine's invariants in
# bfloat16 under eager, sdpa and flash_attention_2 where installed (tests/test_gpu.py; with two GPUs
# visible, also a model split over both by --device-map against the same model on one); every
# family's invariants and M-RoPE oracles in float32 on CUDA (tests/test_family_matrix.py); `vtcbench
# run` of the shipped vtc-tiny (fastv) and vtc-tiny-qwen (vanilla) on the GPU;
# benchmarks/sweep_cost.py at an eighth, a quarter and the full 7B width; benchmarks/method_overhead.py
# and benchmarks/flops_to_time.py at the full 7B width with random weights (fp16); and `vtcbench
# profile` of vanilla, fastv and pdrop on llava-1.5-7b's architecture with random weights (bf16,
# sdpa). Logs and JSON go to $OUT (or gpu-check/), the summary to stdout and summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
# vtcbench's imports that a CUDA image with torch and transformers' usual companions may lack, at
# the versions of requirements/lock.txt (Python 3.12 wheels; --no-deps: each need is named here).
# lmms_eval and what its evaluator imports serve `vtcbench run` and the sweep's benchmark; pydantic,
# typer's parameter coercion.
WHEELS=(transformers tokenizers huggingface_hub safetensors fvcore iopath yacs termcolor typer rich shellingham
        pydantic pydantic_core annotated-types typing-inspection
        lmms_eval loguru dill pytz sniffio truststore httpx2 httpcore2 anyio h11
        datasets evaluate multiprocess nltk numexpr python-dotenv tenacity wcwidth zstandard chardet defusedxml)

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
step invariants 90 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_gpu.py
VTCBENCH_TEST_DEVICE=cuda step family_matrix 100 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_family_matrix.py \
  -k "keep_all or mixed_batch or cached_decode or oracle"
# the README's main job and the shipped Qwen model through lmms-eval on the GPU (float32): the
# accuracy the CPU gives (overall 0.798 for fastv on vtc-tiny, 0.998 for vtc-tiny-qwen)
step run_vtc_tiny 90 python3 -m vtcbench.cli run --method fastv --out "$out/runs"
step run_vtc_tiny_qwen 90 python3 -m vtcbench.cli run --model vtc-tiny-qwen --method vanilla --out "$out/runs"
for width in eighth quarter full; do
  step "sweep_$width" 75 python3 benchmarks/sweep_cost.py --samples 3 --repeats 3 --width "$width"
done
for batch in 1 8; do  # at batch 1 a 7B prefill is host-bound on a fast GPU: time cannot follow FLOPs there
  step "method_overhead_b$batch" 60 python3 benchmarks/method_overhead.py --iterations 5 --batch "$batch"
  step "flops_to_time_b$batch" 50 python3 benchmarks/flops_to_time.py --iterations 10 --batch "$batch"
done
for method in vanilla fastv pdrop; do
  step "profile_$method" 35 python3 -m vtcbench.cli profile --method "$method" --model llava-1.5-7b --random-weights \
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
def lines(name: str, last: int) -> str:
    log = out / f"{name}.log"
    text = log.read_text().strip().splitlines() if log.exists() else ["(not run)"]
    return "\n".join("  " + line for line in text[-last:])
for name in ("invariants", "family_matrix"):
    print(f"{name}:\n" + lines(name, 1))
for name in ("run_vtc_tiny", "run_vtc_tiny_qwen"):
    print(f"{name}:\n" + lines(name, 4))
for width in ("eighth", "quarter", "full"):
    print(f"sweep_cost --width {width}:\n" + lines(f"sweep_{width}", 8))
for batch in (1, 8):
    print(f"method_overhead --batch {batch}:\n" + lines(f"method_overhead_b{batch}", 16))
    print(f"flops_to_time --batch {batch}:\n" + lines(f"flops_to_time_b{batch}", 6))
print(f"{'profile':<9} {'prefill ms':>10} {'ttft ms':>8} {'decode ms/tok':>13} {'KV MiB':>7} {'peak GiB':>8} {'J/sample':>8} "
      f"{'TFLOPs img':>10} {'fvcore/dispatch':>15}")
for method in ("vanilla", "fastv", "pdrop"):
    log = out / f"profile_{method}.log"
    records = [line for line in log.read_text().splitlines() if line.startswith("{")] if log.exists() else []
    if not records:
        print(f"{method:<9} failed (see profile_{method}.log)")
        continue
    record = json.loads(records[-1])
    latency, memory, energy = record["latency_ms"], record["memory"], record["energy"]
    fvcore = record["fvcore"]["language_model_macs"]
    agreement = f"{fvcore / record['opcount']['language_model_macs']:.4f}" if fvcore else "n/a"
    joules = energy["joules_per_sample"]
    print(f"{method:<9} {latency['llm_prefill']['median_ms']:>10.2f} {latency['ttft']['median_ms']:>8.2f} "
          f"{latency['decode_per_token']['median_ms']:>13.2f} {memory['kv_cache_bytes'] / 2**20:>7.1f} "
          f"{(memory['torch_max_allocated_bytes'] or 0) / 2**30:>8.2f} {joules if joules is None else round(joules, 2)!s:>8} "
          f"{record['flops']['tflops_image']:>10.3f} {agreement:>15}")
PY
