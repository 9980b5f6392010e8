"""The connector study (docs/connectors.md): does aligning images to a language model need heavy
machinery, or does a minimal per-modality adaptation suffice?

    python bench/connectors.py [--steps N] [--seeds 0 1 2] [--only NAME ...] [--reuse] [--smoke]

1. Pretrained parts, made by vlm_train itself: a decoder pretrained on text (experiment=toy-lm) and a
   tower pretrained contrastively (experiment=toy-clip); their held-out perplexity and retrieval and
   the checksums of the folders the runs below load, frozen.
2. Every connector variant, in setting A (LLaVA stage 1: tower and decoder frozen, the connector
   alone trains) and setting B (stage 2: the decoder trains too), on two tasks (single-object scenes;
   two or three objects with binding, counting and relations), at one step budget, for each seed.
3. The report: trainable parameters, held-out accuracy per question kind (mean and spread over the
   seeds), steps to 90% of the best, samples/s, peak memory, and the verdict on the founding question.

Each run is `vlm-train experiment=toy-stage1 ...` in a fresh process; every number is read from its
metrics.jsonl (or counted on the built model). `--smoke` (tests/test_bench.py): a little data, a few
steps, two variants, two seeds, setting A, in a temporary folder; the report is printed, not written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import run_details  # bench/_report.py: this folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
MINIMAL = "ln_adapter + modality norms"  # the founding question's minimal adapter: no trainable bridge
VARIANTS = {
    "mlp": ["connector=mlp"],
    "qformer": ["connector=qformer"],
    "perceiver": ["connector=perceiver"],
    "cross_attention": ["connector=cross_attention"],
    "cross_attention + resampler": ["connector=cross_attention", "connector.resampler=perceiver"],
    "ln_adapter": ["connector=ln_adapter"],
    "ln_adapter (frozen bridge)": ["connector=ln_adapter", "connector.train_projection=false"],
    MINIMAL: ["connector=ln_adapter", "connector.train_projection=false", "connector.modality_norms=true"],
}
SETTINGS = {
    "A": ("stage 1: tower and decoder pretrained and frozen, the connector trains", ["llm.freeze=true"]),
    "B": ("stage 2: tower frozen, connector and decoder train", ["llm.freeze=false"]),
}
TASKS = {
    "single": ("one object: colour, shape, position, caption", ["data.synthetic_layout=square"]),
    "relations": ("two or three objects: binding, counting, relations", ["data.synthetic_layout=relations"]),
}
PRETRAINING = {"lm": "experiment=toy-lm", "clip": "experiment=toy-clip"}
# where each task's (and each pretraining run's) synthetic data lives: under --data, or these defaults
DATA = {"single": "data/toy", "relations": "data/toy-relations", "lm": "data/toy-text", "clip": "data/toy-captions"}
SMOKE = {
    "variants": ("mlp", MINIMAL),
    "settings": ("A",),
    "data": ["data.synthetic_train=200", "data.synthetic_eval=16", "data.eval_samples=16", "data.num_workers=0"],
    "train": ["train.micro_batch_size=8", "train.log_every=1"],
}


def vlm_train(overrides: list[str], run_dir: Path, reuse: bool) -> Path:
    """`vlm-train <overrides> run.dir=<run_dir>` in a fresh process (or, with --reuse, a finished run)."""
    if reuse and finished(run_dir):
        return run_dir
    command = [sys.executable, "-m", "vlm_train.train", *overrides, f"run.dir={run_dir}", "train.save_every=0"]
    print(f"== {' '.join(command[3:])}", flush=True)
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return run_dir


def finished(run_dir: Path) -> bool:
    """The run reached its last step and was evaluated there (a stopped run resumes instead)."""
    from vlm_train.config import load_yaml

    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    train = load_yaml(run_dir / "config.yaml").train
    wanted = "eval_" if train.eval else "loss"  # a run without evaluation ends on its last step's record
    return any(r["step"] == train.max_steps and any(k.startswith(wanted) for k in r) for r in records(run_dir))


def folder_name(name: str) -> str:
    """A run's folder name from its variant's: "single-A-ln_adapter (frozen bridge)" -> "single-A-ln_adapter_frozen_bridge"."""
    return name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_dir(args: argparse.Namespace, name: str) -> str:
    return f"data.synthetic_dir={Path(args.data) / name if args.data else DATA[name]}"


def pretrain(args: argparse.Namespace, extra: list[str]) -> dict[str, dict]:
    """The text-pretrained decoder and the contrastive tower: their runs, scores and checksums."""
    parts = {}
    for name, preset in PRETRAINING.items():
        overrides = [preset, data_dir(args, name), *extra]
        overrides += [f"train.max_steps={args.pretrain_steps}"] if args.pretrain_steps else []
        run_dir = vlm_train(overrides, Path(args.runs) / f"pretrain-{name}", args.reuse)
        evaluation = [r for r in records(run_dir) if any(k.startswith("eval_") for k in r)][-1]
        steps = max(r["step"] for r in records(run_dir) if "loss" in r)
        folder = run_dir / "hf"
        parts[name] = {"folder": folder, "eval": evaluation, "steps": steps, "command": " ".join(overrides),
                       "sha256": sha256(folder / "model.safetensors")}  # fmt: skip
    return parts


def study_runs(args: argparse.Namespace, parts: dict, extra: list[str]) -> dict[tuple, list[Path]]:
    """{(task, setting, variant): a run dir per seed}: every combination at one step budget."""
    pretrained = [f"vision.path={parts['clip']['folder']}", f"llm.path={parts['lm']['folder']}"]
    budget = [f"train.max_steps={args.steps}", f"train.eval_every={max(args.steps // 8, 1)}"]
    runs: dict[tuple, list[Path]] = {}
    for task, (_, task_overrides) in TASKS.items():
        for setting in args.settings:
            for variant in args.variants:
                if setting == "B" and variant == MINIMAL:
                    continue  # modality norms freeze the decoder by design: setting A's run
                overrides = ["experiment=toy-stage1", *pretrained, data_dir(args, task), *task_overrides]
                overrides += SETTINGS[setting][1]
                overrides += [*VARIANTS[variant], *budget, *extra]
                name = folder_name(f"{task}-{setting}-{variant}")
                runs[(task, setting, variant)] = [
                    vlm_train([*overrides, f"run.seed={seed}"], Path(args.runs) / f"{name}-seed{seed}", args.reuse)
                    for seed in args.seeds
                ]
    return runs


def trainable_parameters(variant: str, setting: str) -> tuple[int, int]:
    """(connector, whole model) trainable parameters, counted on the model built at meta size."""
    from vlm_train.config import compose
    from vlm_train.models.connectors import count_trainable
    from vlm_train.plan import build_meta_model

    model = build_meta_model(
        compose(["experiment=toy", "vision.freeze=true", *SETTINGS[setting][1], *VARIANTS[variant]])
    )
    return count_trainable(model.connector), count_trainable(model)


def measure(run_dir: Path) -> dict:
    """Held-out accuracy (overall, per kind, and its curve), median samples/s and peak memory of a run."""
    metrics = records(run_dir)
    train = [r for r in metrics if "loss" in r and r["step"] > 1]  # step 1 includes warm-up work
    evaluations = [r for r in metrics if "eval_accuracy" in r]
    final = evaluations[-1]
    return {
        "accuracy": final["eval_accuracy"],
        "by_kind": {k.removeprefix("eval_accuracy_"): v for k, v in final.items() if k.startswith("eval_accuracy_")},
        "curve": [(r["step"], r["eval_accuracy"]) for r in evaluations],
        "samples_per_s": statistics.median(r["samples_per_s"] for r in train),
        "mem_gb": max(r["mem_gb"] for r in train),
    }


def batch_size() -> int:
    from vlm_train.config import compose

    return compose(["experiment=toy-stage1"]).train.micro_batch_size


def spread(values: list[float]) -> str:
    """mean ± standard deviation over the seeds (± 0 with one seed)."""
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {deviation:.3f}"


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, accuracy in curve if accuracy >= target), None)


def table(task: str, setting: str, results: dict[tuple, list[dict]], counts: dict) -> list[str]:
    """One task and setting: a row per variant, each number the mean (± spread) over the seeds."""
    rows = {variant: runs for (t, s, variant), runs in results.items() if (t, s) == (task, setting)}
    kinds = sorted({kind for runs in rows.values() for run in runs for kind in run["by_kind"]})
    best = max(run["accuracy"] for runs in rows.values() for run in runs)
    lines = [
        f"| connector | trainable (connector) | trainable (model) | accuracy | {' | '.join(kinds)} "
        "| steps to 90% of best | samples/s | peak GB |",
        "|---|" + "---:|" * (len(kinds) + 6),
    ]
    for variant, runs in rows.items():
        reached = [steps_to(run["curve"], 0.9 * best) for run in runs]
        to_90 = "/".join("-" if step is None else str(step) for step in reached)
        per_kind = " | ".join(f"{statistics.mean(run['by_kind'].get(k, 0) for run in runs):.2f}" for k in kinds)
        connector, model = counts[(variant, setting)]
        lines.append(
            f"| {variant} | {connector:,} | {model:,} | {spread([run['accuracy'] for run in runs])} | {per_kind} | "
            f"{to_90} | {statistics.mean(run['samples_per_s'] for run in runs):.0f} | "
            f"{max(run['mem_gb'] for run in runs):.2f} |"
        )
    return lines + [
        "",
        f"(best held-out accuracy of any run here: {best:.3f}; steps to 90% of it per seed, '-': not reached)",
    ]


def verdict(task: str, results: dict[tuple, list[dict]], counts: dict) -> str:
    """Setting A: does the minimal adapter reach >= 90% of mlp's accuracy with <= 5% of its parameters?"""
    mlp, minimal = results.get((task, "A", "mlp")), results.get((task, "A", MINIMAL))
    if not mlp or not minimal:
        return f"- {task}: not measured (mlp and `{MINIMAL}` in setting A are both needed)."
    ratios = [m["accuracy"] / max(p["accuracy"], 1e-9) for m, p in zip(minimal, mlp)]  # paired by seed
    params = counts[(MINIMAL, "A")][1] / counts[("mlp", "A")][1]
    answer = "yes" if statistics.mean(ratios) >= 0.9 and params <= 0.05 else "no"
    return (
        f"- {task}: **{answer}**. `{MINIMAL}` trains {counts[(MINIMAL, 'A')][1]:,} parameters ({params:.1%} of mlp's "
        f"{counts[('mlp', 'A')][1]:,}) and reaches {statistics.mean(ratios):.1%} of mlp's held-out accuracy (per seed "
        f"{', '.join(f'{r:.1%}' for r in ratios)}; accuracy {spread([m['accuracy'] for m in minimal])} vs "
        f"{spread([p['accuracy'] for p in mlp])})."
    )


def pretraining_section(parts: dict) -> list[str]:
    lm, clip = parts["lm"], parts["clip"]
    return [
        "## The pretrained parts",
        "",
        f"- Decoder: `vlm-train {lm['command']}` ({lm['steps']} steps, text only, every token a label): held-out "
        f"perplexity **{lm['eval']['eval_perplexity']:.3f}** on {lm['eval']['eval_samples']} documents. "
        f"`{lm['folder'].relative_to(REPO) if lm['folder'].is_relative_to(REPO) else lm['folder']}/model.safetensors` "
        f"sha256 `{lm['sha256']}`.",
        f"- Tower: `vlm-train {clip['command']}` ({clip['steps']} steps, CLIP's loss): zero-shot retrieval on "
        f"{clip['eval']['eval_samples']} held-out scenes, R@1 image->text **{clip['eval']['eval_retrieval_i2t']:.3f}**, "
        f"text->image **{clip['eval']['eval_retrieval_t2i']:.3f}** (chance {clip['eval']['eval_retrieval_chance']:.3f}). "
        f"`model.safetensors` sha256 `{clip['sha256']}`.",
        "- Every run below loads these two folders, frozen (setting A both; setting B the tower).",
    ]


def report(args: argparse.Namespace, parts: dict, results: dict, counts: dict) -> str:
    lines = [
        "# Connectors compared: does aligning a modality need heavy machinery?",
        "",
        f"Measured by {run_details()}, no GPU, {args.machine}. Seeds {', '.join(map(str, args.seeds))}; "
        f"{args.steps} steps of {batch_size()} samples per run, the held-out accuracy (exact match of greedy answers, "
        f"{args.eval_samples} unseen scenes) every {max(args.steps // 8, 1)} steps. Toy sizes: a 2-layer CLIP "
        "tower (64 wide, 9 patches), a 2-layer Llama decoder (128 wide), each connector at experiment=toy's sizes.",
        "",
        *pretraining_section(parts),
    ]
    for task, (task_text, _) in TASKS.items():
        for setting in args.settings:
            lines += ["", f"## Task {task} ({task_text}), setting {setting} ({SETTINGS[setting][0]})", ""]
            lines += table(task, setting, results, counts)
    lines += ["", "## The founding question (setting A)", ""]
    lines += [
        f"Does the minimal adapter (`{MINIMAL}`: LayerNorm affine + the decoder's norms at image positions, no "
        "trainable bridge) reach >= 90% of the MLP projector's held-out accuracy with <= 5% of its trainable "
        "parameters, with tower and decoder pretrained and frozen?",
        "",
        *[verdict(task, results, counts) for task in TASKS],
        "",
        *READING,
    ]
    return "\n".join(lines) + "\n"


READING = [
    "## How to read the tables",
    "",
    "- Setting A is the founding question's setting: the decoder knows the tasks' language (it was pretrained",
    "  on the scenes told in words) and the tower knows the scenes (contrastive pretraining on their",
    "  captions), both frozen; a connector must translate one into the other. In setting B the decoder",
    "  trains too, and can adapt to whatever the connector gives it.",
    f"- `{MINIMAL}` trains no bridge: a LayerNorm without affine, a per-channel scale and shift, a *random*",
    "  linear map to the decoder's width, and a second scale for each of the decoder's norms at image",
    "  positions (connector.modality_norms). `ln_adapter (frozen bridge)` is the same without the",
    "  modality norms; `ln_adapter` trains the linear map as well (then it is a linear projector).",
    "- Trainable parameters are counted on the built model; in setting A they are the connector's alone.",
    "- Steps to 90% of the best: the first evaluation step (every `train.eval_every` steps) at which a",
    "  run's held-out accuracy reaches 90% of the best accuracy any run of its table reached.",
    "- Samples/s is the median over logged steps of one process on the 2 cores (the other runs of the study",
    "  ran one after another, not beside it); peak GB is the process's peak resident memory.",
]


def speed_runs(args: argparse.Namespace, parts: dict, extra: list[str]) -> dict[tuple[str, str], dict]:
    """--speed-steps: each variant's samples/s and peak memory per setting from a short run of its own
    (the single task, seed 0, no evaluation), for when the study's runs did not have the machine alone."""
    pretrained = [f"vision.path={parts['clip']['folder']}", f"llm.path={parts['lm']['folder']}"]
    speeds = {}
    for setting in args.settings:
        for variant in args.variants:
            if setting == "B" and variant == MINIMAL:
                continue
            overrides = ["experiment=toy-stage1", *pretrained, data_dir(args, "single"), *TASKS["single"][1]]
            overrides += [*SETTINGS[setting][1], *VARIANTS[variant], f"train.max_steps={args.speed_steps}"]
            run_dir = Path(args.runs) / folder_name(f"speed-{setting}-{variant}")
            run = vlm_train([*overrides, "train.eval=false", *extra], run_dir, args.reuse)
            train = [r for r in records(run) if "loss" in r and r["step"] > 1]
            speeds[(setting, variant)] = {
                "samples_per_s": statistics.median(r["samples_per_s"] for r in train),
                "mem_gb": max(r["mem_gb"] for r in train),
            }
    return speeds


def study(args: argparse.Namespace, extra: list[str], pretrain_extra: list[str]) -> str:
    """Pretrain, train every combination, measure, and return the report."""
    parts = pretrain(args, pretrain_extra)
    runs = study_runs(args, parts, extra)
    results = {key: [measure(run_dir) for run_dir in run_dirs] for key, run_dirs in runs.items()}
    if args.speed_steps:  # samples/s and memory from the speed runs (both tasks: the single task's)
        speeds = speed_runs(args, parts, extra)
        for (_, setting, variant), measured in results.items():
            for run in measured:
                run.update(speeds[(setting, variant)])
    counts = {(variant, setting): trainable_parameters(variant, setting) for (_, setting, variant) in runs}
    return report(args, parts, results, counts)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps of every study run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--only", dest="variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-samples", type=int, default=200, help="held-out scenes each evaluation scores")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="default: the presets' (toy-lm, toy-clip)")
    parser.add_argument("--data", default=None, help="a folder for the synthetic data (default: data/toy, ...)")
    parser.add_argument("--out", default=str(REPO / "docs" / "connectors.md"))
    parser.add_argument(
        "--speed-steps", type=int, default=0, help="samples/s and memory from separate runs of this many steps"
    )
    parser.add_argument(
        "--machine", default="the machine otherwise idle", help="what else ran on the machine (said in the report)"
    )
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-connectors"))
    parser.add_argument("--reuse", action="store_true", help="report finished runs in --runs instead of training")
    parser.add_argument("--smoke", action="store_true", help="a little data, a few steps, a temporary folder (tests)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    eval_samples = f"data.eval_samples={args.eval_samples}"
    if not args.smoke:
        text = study(args, [eval_samples], [])
        Path(args.out).write_text(text)
        print(f"\n{text}\nwrote {args.out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.steps, args.seeds, args.pretrain_steps, args.runs, args.data = 4, [0, 1], 6, tmp, tmp
        args.variants, args.settings, args.eval_samples = list(SMOKE["variants"]), list(SMOKE["settings"]), 16
        data = [*SMOKE["data"], *SMOKE["train"], "data.eval_samples=16"]
        print(study(args, data, data))


if __name__ == "__main__":
    main()
