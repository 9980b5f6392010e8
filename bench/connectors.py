"""Compare the connectors on the toy task: same data, same step budget, same seed.

    python bench/connectors.py [--steps N] [--out docs/connectors.md] [--smoke]

Each variant trains in a fresh process exactly as `vlm-train experiment=toy connector=...` does,
then its held-out accuracy, throughput and peak memory are read from its metrics.jsonl and its
trainable parameters from the built model. Writes a Markdown report; every number is measured.
`--smoke` (tests/test_bench.py): every variant's model is built, and two of them (mlp and the
frozen-bridge ln_adapter) train 3 steps on a little toy data; runs and report go to a temporary
folder, the report is printed. Training each of the seven variants there costs some 20 s apiece on
2 cores, and tests/test_connectors.py already trains every connector.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import run_details  # bench/_report.py: this folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "mlp": ["connector=mlp"],
    "qformer": ["connector=qformer"],
    "perceiver": ["connector=perceiver"],
    "cross_attention": ["connector=cross_attention"],
    "ln_adapter": ["connector=ln_adapter"],
    "ln_adapter (frozen bridge)": ["connector=ln_adapter", "connector.train_projection=false"],
    "ln_adapter + modality norms": [
        "connector=ln_adapter",
        "connector.train_projection=false",
        "connector.modality_norms=true",
    ],
}
# --smoke: two variants (those the report's founding question compares), a few steps on a little data
SMOKE_VARIANTS = ("mlp", "ln_adapter (frozen bridge)")
SMOKE_OVERRIDES = [
    "train.micro_batch_size=4",
    "train.log_every=1",
    "data.num_workers=0",
    "data.eval_samples=8",
]


def train(name: str, overrides: list[str], steps: int, runs: Path, reuse: bool) -> Path:
    run_dir = runs / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
    if reuse and (run_dir / "metrics.jsonl").is_file() and "eval_accuracy" in (run_dir / "metrics.jsonl").read_text():
        return run_dir
    command = [
        sys.executable,
        "-m",
        "vlm_train.train",
        "experiment=toy",
        *overrides,
        f"train.max_steps={steps}",
        f"run.dir={run_dir}",
        "train.save_every=0",
    ]
    print(f"== {name}: {' '.join(command[3:])}", flush=True)
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return run_dir


def parameter_counts(overrides: list[str]) -> tuple[int, int]:
    from vlm_train import build_model, compose
    from vlm_train.models.connectors import count_trainable

    model = build_model(compose(["experiment=toy", *overrides]))
    return count_trainable(model.connector), count_trainable(model)


def held_out_scenes(overrides: list[str]) -> int:
    """The held-out scenes each variant is scored on (data.eval_samples as the runs compose it)."""
    from vlm_train import compose

    return compose(["experiment=toy", *overrides]).data.eval_samples


def measure(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r and r["step"] > 1]  # step 1 includes warm-up work
    evaluation = [r for r in records if "eval_accuracy" in r][-1]
    samples_per_s = sorted(r["samples_per_s"] for r in train_records)[len(train_records) // 2]
    return {
        "eval_accuracy": evaluation["eval_accuracy"],
        "by_kind": {
            k.removeprefix("eval_accuracy_"): v for k, v in evaluation.items() if k.startswith("eval_accuracy_")
        },
        "samples_per_s": samples_per_s,
        "mem_gb": max(r["mem_gb"] for r in train_records),
        "final_loss": train_records[-1]["loss"],
    }


def report(results: dict[str, dict], steps: int, eval_scenes: int) -> str:
    lines = [
        "# Connectors compared on the toy task",
        "",
        f"Measured by {run_details()}, no GPU. Same data, seed and step budget, {steps} steps; "
        "`experiment=toy` sizes (tiny frozen CLIP tower, 2-layer Llama). Held-out accuracy is exact match "
        f"of greedy answers on {eval_scenes} unseen scenes (chance about 0.16). Throughput is the median over logged "
        "steps; memory is the process's peak RSS.",
        "",
        "| connector | trainable (connector) | trainable (model) | eval accuracy | caption | colour | shape "
        "| position | final loss | samples/s | peak GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        kind = r["by_kind"]
        lines.append(
            f"| {name} | {r['connector_params']:,} | {r['model_params']:,} | {r['eval_accuracy']:.3f} | "
            f"{kind.get('caption', 0):.2f} | {kind.get('color', 0):.2f} | {kind.get('shape', 0):.2f} | "
            f"{kind.get('position', 0):.2f} | {r['final_loss']:.4f} | {r['samples_per_s']:.0f} | "
            f"{r['mem_gb']:.2f} |"
        )
    mlp, adapter = results.get("mlp"), results.get("ln_adapter (frozen bridge)")
    if mlp and adapter:
        accuracy_ratio = adapter["eval_accuracy"] / max(mlp["eval_accuracy"], 1e-9)
        param_ratio = adapter["connector_params"] / mlp["connector_params"]
        verdict = "yes" if accuracy_ratio >= 0.9 and param_ratio <= 0.05 else "no"
        lines += [
            "",
            "## The founding question",
            "",
            f"Does `ln_adapter` reach >= 90% of `mlp`'s accuracy with <= 5% of its trainable connector "
            f"parameters? **{verdict}**: the frozen-bridge adapter trains {adapter['connector_params']:,} "
            f"connector parameters ({param_ratio:.1%} of mlp's {mlp['connector_params']:,}) and reaches "
            f"{accuracy_ratio:.1%} of mlp's held-out accuracy.",
        ]
    lines += [
        "",
        "## Reading the table",
        "",
        "- Position questions (9 cells) separate the connectors: the toy tower is random and frozen, so where a",
        "  patch sits is carried mostly by the order of the visual tokens in the sequence (RoPE). `mlp` and",
        "  `ln_adapter` keep one token per patch in order; `qformer` and `perceiver` pool patches into learned",
        "  queries and `cross_attention` reads them as an unordered set, so their position accuracy stays near",
        "  chance (0.11) while colour and shape are learned.",
        "- `ln_adapter + modality norms` trains only the adapter and the image-position norm affines of a",
        "  *frozen* LLM. The toy LLM is random, so nothing can learn the language here: the variant is meant",
        "  for a pretrained decoder, and this row only shows its parameter count and cost.",
        "- Throughput is for comparison within this table; other load on the machine during the run lowers it.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--out", default=str(REPO / "docs" / "connectors.md"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-connectors"))
    parser.add_argument("--only", nargs="*", default=None, help="a subset of variant names")
    parser.add_argument("--reuse", action="store_true", help="report runs already in --runs instead of training")
    parser.add_argument("--smoke", action="store_true", help="toy data, 3 steps, in a temporary folder (tests)")
    args = parser.parse_args()
    if not args.smoke:
        compare(args, extra=[])
        return
    from vlm_train.data.synthetic import generate

    for overrides in VARIANTS.values():  # every variant's overrides still compose and build
        parameter_counts(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp) / "data", train=40, eval=8, seed=0)
        args.steps, args.runs, args.out = 3, str(Path(tmp) / "runs"), str(Path(tmp) / "connectors.md")
        args.only = args.only or list(SMOKE_VARIANTS)
        compare(args, extra=[f"data.synthetic_dir={data}", *SMOKE_OVERRIDES])


def compare(args: argparse.Namespace, extra: list[str]) -> None:
    """Train (or reuse) each selected variant, then print and write the report."""
    results = {}
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        run_dir = train(name, [*overrides, *extra], args.steps, Path(args.runs), args.reuse)
        connector_params, model_params = parameter_counts(overrides)
        results[name] = {**measure(run_dir), "connector_params": connector_params, "model_params": model_params}
    text = report(results, args.steps, held_out_scenes(extra))
    print("\n" + text)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
