#!/usr/bin/env bash
# One call on a lent GPU machine (e.g. the `nvidia-h200` device): checks vlm_train's GPU path and
# times it, inside a fixed budget, each step under its own `timeout` so that one failure costs only
# its own time and the next step still runs. A short table comes last (the reply's output tail).
#
#   on the device:  bash bench/device_check.sh            (carry .whl: the missing packages as wheels,
#                                                          installed into /tmp/site first; OUT=$OUT)
#   rehearsal here: DRY=1 bash bench/device_check.sh      (CPU, .venv, toy sizes: same steps, same parsing)
# It runs the vlm_train next to it: a snapshot (git archive HEAD, with this script copied in) can be
# carried and run instead of a working tree in the middle of an edit; WHEELS names the wheel folder
# (default: .whl beside the code), PY the Python of a rehearsal (default: .venv/bin/python).
#
# Steps (skipped when the budget left is too small):
#   env       GPU, driver, versions actually imported, torch's varlen_attn signature, a bf16 matmul ceiling
#   bench7b   bench/gpu.py --size 7b (LLaVA-1.5-7B shapes, stage 1, ZeRO-2): vlm_train vs LLaVA's loop
#   toy       vlm-train experiment=toy (the README's first job, all 2,500 steps + held-out evaluation)
#   qwen      vlm-train experiment=toy-qwen2_5-vl data.packing=true (native-res tower, M-RoPE, varlen attention)
#   (qwen_unpacked: the same without packing, only when qwen failed)
#   megatron  vlm-train experiment=toy llm.backend=megatron (megatron-core decoder, TP=1)
#   bench2b   bench/gpu.py --size 2b (stage 2: a 1.7B decoder trains)
# The wheels (.whl, ignored; versions from constraints.txt; `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 ...`): what the image lacks
# or has too old: transformers tokenizers huggingface_hub httpx2 httpcore2 truststore hf-xet idna anyio
# h11 click regex typing_extensions deepspeed hjson pydantic pydantic_core annotated-types
# typing-inspection megatron-core hydra-core omegaconf antlr4-python3-runtime webdataset braceexpand
# (deepspeed and antlr4 are sdists: `DS_BUILD_OPS=0 .venv/bin/pip wheel --no-deps --no-build-isolation`);
# av and wandb are imported only for video and wandb.mode != disabled, and are not carried.
# As run on 2026-12-04 (docs/benchmarks.md, GPU): here `rm -rf .whl/src && mkdir -p .whl/src &&
# git archive HEAD | tar -x -C .whl/src && cp bench/device_check.sh .whl/src/bench/`, then the device
# tool's run with carry [".whl"], timeout_s 450:
#   WHEELS=$PWD/.whl OUT=$OUT BUDGET_S=410 bash .whl/src/bench/device_check.sh 2>&1 | tee $OUT/all.log
# (365 s: 23 s installs + env, 98 s bench7b, 91 s toy, 26 + 42 s qwen, 30 s megatron, 52 s bench2b).
# Writes under $OUT: all step logs + run dirs' metrics (logs.tar.gz), bench_7b.md, bench_2b.md,
# summary.txt. BUDGET_S (default 410) bounds the whole script.
set -u -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
DRY=${DRY:-0}
WHEELS=${WHEELS:-$REPO/.whl}
OUT=${OUT:-/tmp/device_check_out}
WORK=${WORK:-/tmp/dc}
BUDGET=${BUDGET_S:-410}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK/logs" "$WORK/runs" "$WORK/data"
SUMMARY=$WORK/logs/summary.txt
: >"$SUMMARY"

if [ "$DRY" = 1 ]; then
    PY=${PY:-$REPO/.venv/bin/python}
    export CUDA_VISIBLE_DEVICES="" PYTHONPATH=$REPO
    BENCH7="--smoke --stage 1" BENCH2="--smoke --stage 2"
    TOY_STEPS=60 SMALL_STEPS=40 DATA="data.synthetic_train=2048 data.synthetic_eval=128"
else
    PY=python3
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        t0=$(date +%s)
        if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl; then
            echo "bulk wheel install failed; one by one:"
            for w in "$WHEELS"/*.whl; do
                python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$w" || echo "FAILED $w"
            done
        fi
        echo "wheels installed into /tmp/site in $(($(date +%s) - t0)) s"
    else
        echo "no wheels in $WHEELS"
    fi
    export PYTHONPATH=/tmp/site:$REPO
    BENCH7="--size 7b" BENCH2="--size 2b"
    TOY_STEPS=2500 SMALL_STEPS=500 DATA="data.num_workers=4"
fi

export PY WORK DATA

left() { echo $((DEADLINE - $(date +%s))); }

pack() {  # what came back so far: every log, and the run dirs' small files
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs \
        $(cd "$WORK" && find runs -maxdepth 2 \( -name metrics.jsonl -o -name config.yaml -o -name loss_curve.png \) 2>/dev/null) 2>/dev/null
    cp "$SUMMARY" "$OUT/summary.txt"
}

# step NAME TIMEOUT MIN_NEEDED COMMAND...: runs COMMAND into logs/NAME.log under `timeout`, shortened
# to the budget left; skipped when fewer than MIN_NEEDED seconds are left. Prints the log's tail.
step() {
    local name=$1 limit=$2 need=$3
    shift 3
    local remaining
    remaining=$(left)
    if ((remaining < need)); then
        echo "=== $name: SKIPPED (${remaining} s left, needs ${need})"
        echo "$name|skipped|0|-" >>"$SUMMARY"
        return
    fi
    ((limit > remaining)) && limit=$remaining
    echo "=== $name (limit ${limit} s, $(date +%T), $((remaining)) s of budget left)"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$WORK/logs/$name.log" 2>&1  # bash -c: shell functions too
    rc=$?
    local took=$(($(date +%s) - t0))
    grep -v -E '^\[[#.]{20}\] step|^\s*$' "$WORK/logs/$name.log" | tail -n 14 | cut -c1-400
    echo "--- $name: rc=$rc in ${took} s"
    local status=ok
    ((rc == 124 || rc == 137)) && status=TIMEOUT
    ((rc != 0 && rc != 124 && rc != 137)) && status=FAILED
    echo "$name|$status|$took|rc=$rc" >>"$SUMMARY"
    pack
}

# ---------------------------------------------------------------- env
cat >"$WORK/env.py" <<'EOF'
import importlib, inspect, platform, time, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for name in ("transformers", "tokenizers", "huggingface_hub", "deepspeed", "megatron.core", "hydra",
             "omegaconf", "webdataset", "pydantic", "numpy", "PIL", "safetensors", "vlm_train.train"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '')} from {module.__file__}")
    except Exception as err:
        print(f"  {name} IMPORT FAILED: {type(err).__name__}: {err}")
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except Exception as err:
    print("varlen_attn absent:", err)
if torch.cuda.is_available():
    dev = torch.device("cuda")
    print("device", torch.cuda.get_device_name(dev), torch.cuda.get_device_capability(dev),
          f"{torch.cuda.get_device_properties(dev).total_memory / 2**30:.1f} GiB")
    from vlm_train.training.flops import peak_flops
    print("vlm_train peak_flops(bf16):", peak_flops(dev, "bf16", None) / 1e12, "TFLOPS")
    a, b = (torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    print(f"bf16 matmul 8192^3 on random data: {2 * 8192**3 / seconds / 1e12:.0f} TFLOP/s (median-free mean of 20)")
    from vlm_train.models.varlen_attention import varlen_kernel
    print("vlm_train varlen kernel (bf16, head 64):", varlen_kernel(dev, torch.bfloat16, 64))
EOF
env_step() {
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>&1
    nproc
    free -g | head -2
    "$PY" "$WORK/env.py"
}
export -f env_step
step env 90 30 env_step

# ---------------------------------------------------------------- the benchmark, 7B
step bench7b 220 150 "$PY" bench/gpu.py $BENCH7 --out "$WORK/logs/bench_7b.md"
[ -f "$WORK/logs/bench_7b.md" ] && cp "$WORK/logs/bench_7b.md" "$OUT/bench_7b.md"

# ---------------------------------------------------------------- the CLI, real runs
train() {  # train NAME OVERRIDES...
    local name=$1
    shift
    "$PY" -m vlm_train.train "$@" run.dir="$WORK/runs/$name" train.save_every=0 $DATA
}
export -f train
step toy 110 60 train toy experiment=toy train.max_steps=$TOY_STEPS data.synthetic_dir="$WORK/data/toy"
step qwen 75 45 train qwen experiment=toy-qwen2_5-vl data.packing=true train.max_steps=$SMALL_STEPS \
    train.log_every=50 data.synthetic_dir="$WORK/data/toy-anyres"
if ! grep -q '^qwen|ok|' "$SUMMARY"; then  # packed rows failed: the same run unpacked, to tell the two apart
    step qwen_unpacked 60 40 train qwen_unpacked experiment=toy-qwen2_5-vl train.max_steps=$SMALL_STEPS \
        train.log_every=50 data.synthetic_dir="$WORK/data/toy-anyres"
fi
step megatron 60 40 train megatron experiment=toy llm.backend=megatron train.max_steps=$SMALL_STEPS \
    train.log_every=50 data.synthetic_dir="$WORK/data/toy"

# ---------------------------------------------------------------- the benchmark, 2B (stage 2)
step bench2b 130 90 "$PY" bench/gpu.py $BENCH2 --out "$WORK/logs/bench_2b.md"
[ -f "$WORK/logs/bench_2b.md" ] && cp "$WORK/logs/bench_2b.md" "$OUT/bench_2b.md"

# ---------------------------------------------------------------- summary
cat >"$WORK/summary.py" <<'EOF'
import json, re, statistics, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = [line.split("|") for line in (work / "logs" / "summary.txt").read_text().splitlines()]
print("| step | status | seconds | rc | numbers |")
print("|---|---|---|---|---|")
for name, status, took, rc in rows:
    notes = ""
    metrics = work / "runs" / name / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_accuracy" in r]
        if train:
            later = train[1:] or train
            med = lambda key: statistics.median(r[key] for r in later if key in r) if any(key in r for r in later) else float("nan")
            notes = (f"steps {train[-1]['step']}, loss {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}, "
                     f"median {med('tokens_per_s'):.0f} tokens/s, {med('samples_per_s'):.0f} samples/s, "
                     f"mfu {100 * med('mfu'):.2f}%, {1e3 * med('step_s'):.1f} ms/step, "
                     f"mem_gb max {max(r.get('mem_gb', float('nan')) for r in train)}")
        if evals:
            notes += f", eval_accuracy {evals[-1]['eval_accuracy']:.3f} (eval_loss {evals[-1]['eval_loss']:.4f})"
        log = work / "logs" / f"{name}.log"
        took_line = re.findall(r"trained to step .*", log.read_text(errors="replace")) if log.is_file() else []
        if took_line:
            notes += f"; {took_line[-1]}"
    for md in (work / "logs").glob(f"bench_{name[5:]}.md") if name.startswith("bench") else []:
        ratio = re.search(r"\*\*vlm_train / baseline: (.*?)\*\*", md.read_text())
        notes = f"ratio {ratio.group(1) if ratio else '?'} (section written)"
    if name.startswith("bench") and not notes:
        log = work / "logs" / f"{name}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        found = [l for l in text.splitlines() if l.startswith("| ") or "vlm_train / baseline:" in l]
        notes = " ".join(found[-4:])[:600] or "no section"
    print(f"| {name} | {status} | {took} | {rc} | {notes} |")
EOF
echo
echo "=== summary ($(( $(date +%s) - START )) s in all)"
"$PY" "$WORK/summary.py" "$WORK" | tee "$WORK/logs/summary.md"
pack
cp "$WORK/logs/summary.md" "$OUT/summary.md" 2>/dev/null
for f in bench_7b bench_2b; do
    [ -f "$WORK/logs/$f.md" ] && { echo; echo "=== $f.md"; sed -n '3,12p' "$WORK/logs/$f.md"; }
done
exit 0
