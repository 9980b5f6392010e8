"""llm.backend=megatron: HF logits at TP=1 and TP=2, TP=2 training equal to TP=1 for ZeRO 0-3,
TP2 x DP2 equal to TP1 x DP2 with clipping, every connector training at TP=2, exact resume, export
to transformers after training, and layout mistakes as one-line errors.

The runs go through the real training function (`vlm_train.train._train`: data pipeline, DeepSpeed
engine with the layout's mpu, Trainer) in a few multi-process launches of this file, which runs
several configs per launch to fit the time budget; one run goes through the CLI as users type it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if __name__ != "__main__":
    from tests.helpers import REPO, read_metrics, run_cli, step_losses, torchrun, toy_overrides

pytestmark = pytest.mark.slow

STEPS = 20
TRAIN = ("train.precision=fp32", "train.warmup_steps=2", "train.lr=2e-3", "vision.freeze=false")


def launch(plan: list[dict], nproc: int, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run this file under torchrun: every rank works through `plan` (runs and checks) in order."""
    plan_file = Path(plan[0]["dir"]).parent / f"plan{nproc}.json"
    plan_file.write_text(json.dumps(plan))
    command = torchrun(nproc, str(Path(__file__)), str(plan_file))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


COLOUR_TRAIN = (
    "train.max_steps=8",
    "train.micro_batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=1",
    "train.min_lr_ratio=1.0",
)


def colour_turns(colour: str) -> list[dict]:
    return [{"from": "human", "value": "<image>\nwhat color is the image ?"}, {"from": "gpt", "value": colour}]


def write_colour_shards(folder: Path) -> str:
    """Two shards of 48 colour images asking their colour; returns their brace pattern."""
    import io

    from PIL import Image

    from tests.helpers import colour_images, write_tar

    folder.mkdir(parents=True)
    images = iter(colour_images(96, seed=1))
    for shard in range(2):
        samples = []
        for i in range(48):
            pixels, colour = next(images)
            png = io.BytesIO()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(png, format="PNG")
            record = {"conversations": colour_turns(colour)}
            samples.append({"__key__": f"{shard}-{i:03d}", "png": png.getvalue(), "json": json.dumps(record).encode()})
        write_tar(folder / f"colours-{shard}.tar", samples)
    return str(folder / "colours-{0..1}.tar")


def run(data: Path, run_dir: Path, *extra: str) -> dict:
    return {"kind": "train", "dir": str(run_dir), "overrides": toy_overrides(data, run_dir, *TRAIN, *extra)}


def assert_same_losses(runs: dict[str, dict[int, float]], reference: str, steps: int, rel: float = 1e-5) -> None:
    for name, losses in runs.items():
        assert sorted(losses) == list(range(1, steps + 1)), name
        for step in range(1, steps + 1):
            assert losses[step] == pytest.approx(runs[reference][step], rel=rel), (name, step)


@pytest.fixture(scope="module")
def tp_runs(toy_data, tmp_path_factory) -> Path:
    """All multi-process work of this file, launched once: 1, 2 and 4 ranks."""
    root = tmp_path_factory.mktemp("tp")
    steps = (f"train.max_steps={STEPS}",)
    one = [run(toy_data, root / "tp1", *steps, "llm.backend=megatron", "train.save_every=0")]
    colours = (f"data.urls={write_colour_shards(root / 'colours')}", *COLOUR_TRAIN)
    one.append(
        run(
            toy_data,
            root / "conn_cross_attention_tp1",
            *colours,
            "llm.backend=megatron",
            "connector=cross_attention",
        )
    )
    launch(one, nproc=1)
    plan = [{"kind": "parity", "dir": str(root / "parity")}]
    for stage in (0, 1, 2, 3):
        plan.append(
            run(
                toy_data,
                root / f"tp2_zero{stage}",
                *steps,
                "parallel.tensor_parallel=2",
                f"parallel.zero_stage={stage}",
            )
        )
    plan.append({"kind": "logits", "dir": str(root / "tp2_zero0")})
    clipped = ("train.max_steps=8", "train.grad_clip=0.05", "llm.backend=megatron")
    for stage in (1, 3):
        plan.append(run(toy_data, root / f"tp1dp2_zero{stage}", *clipped, f"parallel.zero_stage={stage}"))
    for connector in ("mlp", "cross_attention", "qformer", "perceiver", "ln_adapter"):
        plan.append(
            run(toy_data, root / f"conn_{connector}", *colours, "parallel.tensor_parallel=2", f"connector={connector}")
        )
        plan.append({"kind": "colours", "dir": str(root / f"conn_{connector}")})
    # modality norms (LLM frozen) split over TP: the frozen decoder cannot learn a new answer in 8 steps, toy data
    modality = ("connector=ln_adapter", "connector.modality_norms=true", "train.max_steps=8")
    plan.append(run(toy_data, root / "conn_modality_norms", *modality, "parallel.tensor_parallel=2"))
    resume = ("train.max_steps=6", "train.save_every=3", "parallel.tensor_parallel=2", "parallel.zero_stage=1")
    plan.append(run(toy_data, root / "whole", *resume))
    plan.append({"kind": "copy_step", "dir": str(root / "resumed"), "source": str(root / "whole"), "step": 3})
    plan.append(run(toy_data, root / "resumed", *resume))
    frozen = ("train.max_steps=4", "train.save_every=2", "parallel.tensor_parallel=2", "llm.freeze=true")
    plan.append(run(toy_data, root / "whole_frozen", *frozen))
    plan.append(
        {"kind": "copy_step", "dir": str(root / "resumed_frozen"), "source": str(root / "whole_frozen"), "step": 2}
    )
    plan.append(run(toy_data, root / "resumed_frozen", *frozen))
    launch(plan, nproc=2)
    four = [
        run(toy_data, root / f"tp2dp2_zero{s}", *clipped, "parallel.tensor_parallel=2", f"parallel.zero_stage={s}")
        for s in (1, 3)
    ]
    launch(four, nproc=4)
    return root


def test_megatron_decoder_gives_hf_logits_at_tp1_and_tp2(tp_runs):
    """Whole VLM (GQA, tied and untied, and from a HF checkpoint folder) and a decoder whose
    vocabulary TP=2 must pad: max |logit difference| to the HF model under 1e-4; vocab-parallel loss
    equal to the unsharded one; the in-memory export gives back the HF weights."""
    report = json.loads((tp_runs / "parity" / "report.json").read_text())
    assert len(report["logits"]) == 5
    for case, diff in report["logits"].items():
        assert diff < 1e-4, case
    for tp, (ours, reference) in report["loss"].items():
        assert ours == pytest.approx(reference, rel=1e-6), tp


def test_tp2_matches_tp1_for_every_zero_stage(tp_runs):
    """20 fp32 steps: 2-rank TP=2 (ZeRO 0-3) per-step losses within 1e-5 relative of 1-rank TP=1."""
    runs = {name: step_losses(tp_runs / name) for name in ("tp1", *(f"tp2_zero{s}" for s in range(4)))}
    assert_same_losses(runs, "tp1", STEPS)
    assert runs["tp1"][STEPS] < runs["tp1"][1] - 0.3  # it trains: the comparison is not of a flat line
    norms = {name: [r["grad_norm"] for r in read_metrics(tp_runs / name) if "grad_norm" in r] for name in runs}
    for name, values in norms.items():  # ZeRO-0's norm is ours (TP shards summed over the group), 1-3 DeepSpeed's
        assert values == pytest.approx(norms["tp1"], rel=1e-4), name


def test_tp2_dp2_matches_tp1_dp2_with_clipping(tp_runs):
    """4 ranks TP2 x DP2 vs 2 ranks TP1 x DP2, ZeRO-1 and ZeRO-3, clipping at 0.05 active every step."""
    for stage in (1, 3):
        runs = {name: step_losses(tp_runs / name) for name in (f"tp1dp2_zero{stage}", f"tp2dp2_zero{stage}")}
        assert_same_losses(runs, f"tp1dp2_zero{stage}", 8)
        norms = [r["grad_norm"] for r in read_metrics(tp_runs / f"tp2dp2_zero{stage}") if "grad_norm" in r]
        reference = [r["grad_norm"] for r in read_metrics(tp_runs / f"tp1dp2_zero{stage}") if "grad_norm" in r]
        assert min(norms) > 0.05 and norms == pytest.approx(reference, rel=1e-4)


def test_every_connector_trains_at_tp2(tp_runs):
    """8 steps on images whose colour is the answer. On held-out images, swapping the images between
    samples makes the answer's loss worse: the TP model answers from the image (an image-blind
    connector gives both losses equal). tests/test_connectors.py holds the stronger check at TP=1
    (beating ln 3, the best an image-blind model can do); 8 TP steps do not get every connector there."""
    for connector in ("mlp", "cross_attention", "qformer", "perceiver", "ln_adapter", "modality_norms"):
        losses = step_losses(tp_runs / f"conn_{connector}")
        assert losses[8] < losses[1], (connector, losses)
        if connector != "modality_norms":
            held_out = json.loads((tp_runs / f"conn_{connector}" / "colours.json").read_text())
            assert held_out["swapped"] > held_out["seen"] + 0.05, (connector, held_out)
    # the gated cross-attention blocks are split over TP like the decoder layers they run in
    runs = {name: step_losses(tp_runs / name) for name in ("conn_cross_attention_tp1", "conn_cross_attention")}
    assert_same_losses(runs, "conn_cross_attention_tp1", 8)


def test_tp2_checkpoint_resumes_exactly(tp_runs):
    whole, resumed = step_losses(tp_runs / "whole"), step_losses(tp_runs / "resumed")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == whole[step], step
    # a frozen TP decoder is left out of checkpoints; its shards' digest (per TP rank, combined) is checked on resume
    whole, resumed = step_losses(tp_runs / "whole_frozen"), step_losses(tp_runs / "resumed_frozen")
    assert sorted(resumed) == [3, 4] and all(resumed[step] == whole[step] for step in (3, 4))


def test_tp2_run_exports_to_transformers_with_our_logits(tp_runs, tmp_path):
    """vlm-convert to-hf joins the TP shards; LlavaForConditionalGeneration gives our logits."""
    import torch
    from transformers import LlavaForConditionalGeneration

    calls = [f"main(['to-hf', {str(tp_runs / f'tp2_zero{s}')!r}, {str(tmp_path / f'hf{s}')!r}])" for s in (0, 3)]
    code = f"import sys; from vlm_train.convert import main; sys.exit({' or '.join(calls)})"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = torch.load(tp_runs / "tp2_zero0" / "ours.pt")
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf0").eval()
    with torch.no_grad():
        theirs = hf(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"]).logits
    assert (theirs - ours["logits"]).abs().max() < 1e-4
    # ZeRO-3 shards each TP rank's weights over DP: consolidated per TP rank, the same weights
    same = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf3").state_dict()
    for name, tensor in LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf0").state_dict().items():
        assert (same[name] - tensor).abs().max() < 1e-4, name


def test_toy_command_from_the_readme_trains_and_evaluates_at_tp2(toy_data, tmp_path):
    """`torchrun --nproc_per_node=2 -m vlm_train.train experiment=toy parallel.tensor_parallel=2`
    (llm.backend is auto: megatron at TP > 1), with the end-of-run greedy evaluation."""
    from vlm_train.config import load_yaml

    run_dir = tmp_path / "toy"
    overrides = toy_overrides(
        toy_data,
        run_dir,
        "parallel.tensor_parallel=2",
        "train.max_steps=3",
        "train.eval=true",
        "data.eval_samples=8",
        "data.max_new_tokens=4",
    )
    result = run_cli(overrides, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_yaml(run_dir / "config.yaml").llm.backend == "megatron"
    assert "eval_accuracy" in read_metrics(run_dir)[-1]


LAYOUT_MISTAKES = [
    (["parallel.tensor_parallel=3", "llm.num_heads=32", "llm.num_kv_heads=32"], "32 attention heads"),
    (["parallel.tensor_parallel=2", "llm.num_kv_heads=1"], "does not divide the decoder's 1 key/value heads"),
    (["parallel.tensor_parallel=2"], "does not divide the world size 1"),
    (["parallel.tensor_parallel=2", "llm.backend=hf"], "needs the tensor-parallel decoder"),
    (["parallel.sequence_parallel=true"], "sequence_parallel=true is not supported"),
]


def test_layout_mistake_ends_in_one_line_and_exit_2(toy_data, tmp_path):
    """TP=3 with 32 heads, as a user launches it: one line on stderr, exit code 2, no traceback."""
    overrides, message = LAYOUT_MISTAKES[0]
    result = run_cli(toy_overrides(toy_data, tmp_path / "bad", *overrides))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vlm-train: error: parallel.tensor_parallel=3 does not divide the decoder's 32 attention heads"
    ]


@pytest.mark.parametrize(("overrides", "message"), LAYOUT_MISTAKES[1:])
def test_layout_mistakes_are_refused_before_any_process_group(toy_data, tmp_path, capsys, overrides, message):
    from vlm_train.train import main

    assert main(toy_overrides(toy_data, tmp_path / "bad", *overrides)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-train: error: ") and message in lines[0]


# --- the launched side ------------------------------------------------------------------------


def worker(plan: list[dict]) -> None:
    from vlm_train.config import compose
    from vlm_train.parallel.distributed import init_distributed, launch_env, shutdown
    from vlm_train.parallel.layout import Layout
    from vlm_train.train import _quiet_libraries, _train

    env = launch_env()
    _quiet_libraries(env.rank)
    first = compose(plan[0].get("overrides", ["experiment=toy"]))
    device = init_distributed(first.parallel, env)
    for step in plan:
        if step["kind"] == "train":
            cfg = compose(step["overrides"])
            _train(cfg, Layout.from_config(cfg, world=env.world, rank=env.rank), device)
        elif step["kind"] == "parity":
            parity_report(Path(step["dir"]), env)
        elif step["kind"] == "logits":
            save_trained_logits(Path(step["dir"]), env)
        elif step["kind"] == "colours":
            save_colour_answers(Path(step["dir"]), env)
        elif step["kind"] == "copy_step" and env.rank == 0:
            keep_only_checkpoint(Path(step["source"]), Path(step["dir"]), step["step"])
        import torch.distributed as dist

        dist.barrier()
    shutdown()


def parity_report(folder: Path, env) -> None:
    import torch

    from vlm_train.build import build_model
    from vlm_train.config import LLMConfig, compose
    from vlm_train.models.llm import build_llm
    from vlm_train.models.vlm import token_cross_entropy
    from vlm_train.parallel.layout import Layout
    from vlm_train.parallel.tensor_parallel import from_hf_decoder

    report: dict = {"logits": {}, "loss": {}}
    for tp in (1, 2):
        for tied in (False, True):
            overrides = ["experiment=toy", "llm.num_kv_heads=2", f"llm.tie_embeddings={str(tied).lower()}"]
            hf_cfg, tp_cfg = compose([*overrides, "llm.backend=hf"]), compose([*overrides, "llm.backend=megatron"])
            layout = Layout(world=env.world, rank=env.rank, tp=tp, zero_stage=0, backend="megatron")
            layout.build_groups()
            torch.manual_seed(0)
            reference = build_model(hf_cfg).eval()
            torch.manual_seed(0)
            ours = build_model(tp_cfg, layout=layout).eval()
            pixels, ids = example_batch(reference, seed=1)
            with torch.no_grad():
                diff = (ours(pixels, ids).logits - reference(pixels, ids).logits).abs().max()
            report["logits"][f"tp{tp}_{'tied' if tied else 'untied'}"] = float(diff)
            # in-memory export: the TP shards joined back are the HF weights they were cut from
            exported = ours.llm.to_hf().hf_model.state_dict()
            for name, tensor in reference.llm.hf_model.state_dict().items():
                assert torch.equal(exported[name], tensor), (tp, tied, name)
        # a vocabulary of 101 tokens: TP=2 pads it to 102, and the padding must not enter the loss
        torch.manual_seed(0)
        hf = build_llm(LLMConfig(path=None, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96), 101)
        sharded = from_hf_decoder(hf, Layout(world=env.world, rank=env.rank, tp=tp, zero_stage=0, backend="megatron"))
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
        labels = ids.masked_fill(torch.arange(9) < 3, -100)
        with torch.no_grad():
            ours_loss = sharded.token_cross_entropy(sharded(sharded.embed(ids)), labels)[0]
            reference_loss = token_cross_entropy(hf(hf.embed(ids)), labels)[0]
            diff = (sharded.gather_logits(sharded(sharded.embed(ids))) - hf(hf.embed(ids))).abs().max()
        assert float(diff) < 1e-4, diff
        report["loss"][str(tp)] = [float(ours_loss), float(reference_loss)]
    report["logits"]["tp2_from_hf_folder"] = logits_from_hf_folder(folder, env)
    check_cross_attention_shards_join(env)
    if env.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report))


def logits_from_hf_folder(folder: Path, env) -> float:
    """A HF Llama checkpoint folder (llm.path) trains at TP=2 with no conversion step: its logits."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.parallel.layout import Layout

    path = folder / "llama"
    if env.rank == 0:
        torch.manual_seed(5)
        config = LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
        )
        LlamaForCausalLM(config).save_pretrained(path)
    dist.barrier()
    overrides = ["experiment=toy", f"llm.path={path}", "llm.tokenizer=toy"]
    tp_cfg = compose([*overrides, "llm.backend=megatron", "parallel.tensor_parallel=2"])
    layout = Layout.from_config(tp_cfg, world=env.world, rank=env.rank)  # reads the folder's shape
    layout.build_groups()
    torch.manual_seed(0)
    reference = build_model(compose([*overrides, "llm.backend=hf"])).eval()
    torch.manual_seed(0)
    ours = build_model(tp_cfg, layout=layout).eval()
    pixels, ids = example_batch(reference, seed=4)
    with torch.no_grad():
        return float((ours(pixels, ids).logits - reference(pixels, ids).logits).abs().max())


def check_cross_attention_shards_join(env) -> None:
    """At TP=2 each rank holds half of every block linear; joined, they are the whole blocks."""
    import torch
    import torch.distributed as dist

    from vlm_train.build import build_model
    from vlm_train.config import compose
    from vlm_train.interop.tp_plan import join_cross_attention_shards
    from vlm_train.parallel.layout import Layout

    overrides = ["experiment=toy", "connector=cross_attention"]
    layout = Layout(world=env.world, rank=env.rank, tp=2, zero_stage=0, backend="megatron")
    layout.build_groups()
    torch.manual_seed(0)
    whole = build_model(compose([*overrides, "llm.backend=hf"])).connector.state_dict()
    torch.manual_seed(0)
    split = build_model(compose([*overrides, "llm.backend=megatron"]), layout=layout).connector
    assert any(".parallel." in name for name in split.state_dict())
    shards = [None] * env.world
    tensors = {k: v for k, v in split.state_dict().items() if isinstance(v, torch.Tensor)}
    dist.all_gather_object(shards, tensors)
    joined = join_cross_attention_shards(shards)
    assert sorted(joined) == sorted(whole)
    for name, tensor in whole.items():
        assert torch.equal(joined[name], tensor), name


def example_batch(model, seed: int):
    """One image and a prompt: the image-token slots, then text tokens."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    size = model.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=generator)
    text = torch.randint(3, model.image_token_id, (12,), generator=generator)
    ids = torch.cat([torch.full((model.num_image_tokens,), model.image_token_id), text])[None]
    return pixels, ids


def trained_model(run_dir: Path, env):
    """The TP model rebuilt and loaded from this rank's file of the run's latest checkpoint, and its config."""
    import torch

    from vlm_train.build import build_model
    from vlm_train.config import load_yaml
    from vlm_train.parallel.layout import Layout
    from vlm_train.training.checkpoint import latest_checkpoint

    folder = latest_checkpoint(run_dir)
    cfg = load_yaml(folder / "config.yaml")
    layout = Layout.from_config(cfg, world=env.world, rank=env.rank)
    layout.build_groups()
    model = build_model(cfg, layout=layout).eval()
    states = torch.load(folder / f"mp_rank_{layout.tp_rank:02d}_model_states.pt", weights_only=False)["module"]
    model.load_state_dict(states, strict=False)  # frozen tower weights are rebuilt, not saved
    return model, cfg


def save_colour_answers(run_dir: Path, env) -> None:
    """The answer token's loss on 12 held-out colour images, with each sample's own image and with
    the images rolled by one (every image then shows another colour), and the greedy accuracy."""
    import torch
    import torch.nn.functional as F

    from vlm_train.data import encode_conversation
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.models.vlm import IGNORE_INDEX

    model, cfg = trained_model(run_dir, env)
    tokenizer = load_tokenizer(cfg.llm)
    images = colour_images(12, seed=2)
    ids, labels = encode_conversation(colour_turns("red"), tokenizer, cfg.data.template, model.num_image_tokens)
    answer_at = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)  # the colour: one token
    assert tokenizer.decode(ids[answer_at]) == "red", tokenizer.decode(ids)
    ids = torch.tensor([ids[:answer_at]] * 12)  # the prompt, ready for the answer
    answers = torch.tensor([tokenizer.convert_tokens_to_ids(colour) for _, colour in images])
    pixels = torch.stack([image for image, _ in images])
    with torch.no_grad():
        seen, swapped = (model(p, ids).logits[:, -1].float() for p in (pixels, pixels.roll(1, 0)))
    report = {
        "seen": F.cross_entropy(seen, answers).item(),
        "swapped": F.cross_entropy(swapped, answers).item(),
        "accuracy": (seen.argmax(-1) == answers).float().mean().item(),
    }
    if env.rank == 0:
        (run_dir / "colours.json").write_text(json.dumps(report))


def save_trained_logits(run_dir: Path, env) -> None:
    """Our logits after training: the TP model rebuilt and loaded from this rank's checkpoint file."""
    import torch

    model, _ = trained_model(run_dir, env)
    pixels, ids = example_batch(model, seed=3)
    with torch.no_grad():
        logits = model(pixels, ids).logits
    if env.rank == 0:
        torch.save({"pixel_values": pixels, "input_ids": ids, "logits": logits}, run_dir / "ours.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    # also sets the same environment defaults as pytest
    from tests.helpers import colour_images, keep_only_checkpoint, run_worker

    run_worker(worker)
