"""The five connectors: each builds, trains and handles text-only batches; cross-attention and
modality norms leave the plain LLM exactly as it was where no image is involved."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import COLOUR_ANSWERS, TOKENIZER, colour_images, make_batch
from vlm_train import build_model, compose
from vlm_train.models.connectors import CONNECTORS, count_trainable
from vlm_train.models.vlm import IGNORE_INDEX


def toy_model(connector: str, *extra: str):
    torch.manual_seed(0)
    return build_model(compose(["experiment=toy", f"connector={connector}", *extra]), TOKENIZER)


def colour_batch(model, images: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, ...]:
    """Every sample asks the same question; only its image tells the answer (the last token, the only label)."""
    question = TOKENIZER("what color is the image ?", add_special_tokens=False).input_ids
    slots = [model.image_token_id] * model.num_image_tokens
    ids, labels = [], []
    for _, colour in images:
        answer = TOKENIZER.convert_tokens_to_ids(colour)
        ids.append([TOKENIZER.bos_token_id, *slots, *question, answer])
        labels.append([IGNORE_INDEX] * (len(ids[-1]) - 1) + [answer])
    ids_BT = torch.tensor(ids)
    return torch.stack([pixels for pixels, _ in images]), ids_BT, torch.ones_like(ids_BT), torch.tensor(labels)


# patch_merger merges 2 x 2 blocks of patches: the toy tower's 3 x 3 grid becomes 4 x 4
EVEN_GRID = {"patch_merger": ["vision.patch_size=12"]}


@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_connector_trains_with_and_without_images(connector):
    """10 steps on images whose colour is the answer, then held-out images: the loss beats ln 3, the
    least any image-blind model can reach on balanced answers to one question, and swapping the
    images between samples makes it worse (an image-blind connector fails both)."""
    model = toy_model(connector, "vision.freeze=false", *EVEN_GRID.get(connector, []))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    train, held_out = colour_images(24, seed=1), colour_images(12, seed=2)
    losses = []
    for step in range(10):
        out = model(*colour_batch(model, train[8 * (step % 3) : 8 * (step % 3) + 8]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    pixels, input_ids, mask, labels = colour_batch(model, held_out)
    with torch.no_grad():
        seen = model(pixels, input_ids, mask, labels).loss.item()
        swapped = model(pixels.roll(1, 0), input_ids, mask, labels).loss.item()  # every image now another colour
        accuracy = (model(pixels, input_ids, mask).logits[:, -2].argmax(-1) == labels[:, -1]).float().mean().item()
    assert seen < math.log(len(COLOUR_ANSWERS)) - 0.2 and swapped > seen + 0.5, (seen, swapped)
    assert accuracy >= 2 / 3, accuracy  # a blind model answers one colour for all: 1/3
    text_only = model(*make_batch(model, TOKENIZER, with_image=(False, False)))
    text_only.loss.backward()  # the vision path stays in the graph (ZeRO-3 needs it), contributing 0
    assert count_trainable(model.connector) > 0


def test_connectors_report_their_visual_tokens():
    assert toy_model("mlp").num_image_tokens == 9  # one per patch
    assert toy_model("qformer", "connector.num_queries=5").num_image_tokens == 5
    assert toy_model("perceiver", "connector.num_latents=4").num_image_tokens == 4
    assert toy_model("cross_attention").num_image_tokens == 1  # marks where the image is
    assert toy_model("patch_merger", *EVEN_GRID["patch_merger"]).num_image_tokens == 4  # 4 x 4 patches, 2 x 2 merged


def plain_llm_logits(model, input_ids, mask):
    return model.llm(model.llm.embed(input_ids), mask)


def test_cross_attention_starts_as_the_plain_llm():
    model = toy_model("cross_attention").eval()
    pixel_values, input_ids, mask, _ = make_batch(model, TOKENIZER)
    assert len(model.connector.blocks) == len(model.llm.decoder_layers())
    torch.testing.assert_close(
        model(pixel_values, input_ids, mask).logits, plain_llm_logits(model, input_ids, mask), rtol=0, atol=0
    )


def test_cross_attention_gates_receive_gradients():
    model = toy_model("cross_attention")
    model(*make_batch(model, TOKENIZER)).loss.backward()
    for block in model.connector.blocks:
        assert block.attn_gate.grad.abs().item() > 0 and block.ff_gate.grad.abs().item() > 0


def test_cross_attention_tokens_before_an_image_do_not_see_it():
    model = toy_model("cross_attention").eval()
    for block in model.connector.blocks:  # open the gates so images matter
        block.attn_gate.data.fill_(1.0)
        block.ff_gate.data.fill_(1.0)
    pixel_values, input_ids, mask, _ = make_batch(model, TOKENIZER)
    image_at = int((input_ids[0] == model.image_token_id).nonzero()[0])
    assert image_at > 1
    a = model(pixel_values, input_ids, mask).logits
    b = model(torch.randn_like(pixel_values), input_ids, mask).logits
    torch.testing.assert_close(a[:, :image_at], b[:, :image_at], rtol=0, atol=0)
    assert (a[:, image_at:] - b[:, image_at:]).abs().max() > 1e-3
    # and a sample only sees its own image: changing sample 1's image leaves sample 0 alone
    other = pixel_values.clone()
    other[1] = torch.randn_like(other[1])
    torch.testing.assert_close(model(other, input_ids, mask).logits[0], a[0], rtol=0, atol=0)


def test_ln_adapter_modality_norms_train_alone_and_leave_text_exact():
    model = toy_model("ln_adapter", "connector.modality_norms=true", "connector.train_projection=false")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"connector.scale", "connector.shift"} | {
        name for name, _ in model.connector.image_norms.named_parameters(prefix="connector.image_norms")
    }
    assert len(model.connector.image_norms) == len(model.llm.norm_modules()) == 2 * 2 + 1
    model.eval()
    for affine in model.connector.image_norms:  # as after training: image affines differ
        affine.weight.data.mul_(1.5)
    pixel_values, input_ids, mask, labels = make_batch(model, TOKENIZER, with_image=(False, False))
    torch.testing.assert_close(
        model(pixel_values, input_ids, mask).logits, plain_llm_logits(model, input_ids, mask), rtol=0, atol=0
    )
    pixel_values, input_ids, mask, labels = make_batch(model, TOKENIZER)
    image_at = int((input_ids[0] == model.image_token_id).nonzero()[0])
    with_images = model(pixel_values, input_ids, mask).logits
    torch.testing.assert_close(with_images[:, :image_at], plain_llm_logits(model, input_ids, mask)[:, :image_at])
    model(pixel_values, input_ids, mask, labels).loss.backward()
    assert all(p.grad is not None for p in model.connector.image_norms.parameters())


def test_ln_adapter_is_tiny():
    mlp, adapter = toy_model("mlp"), toy_model("ln_adapter", "connector.train_projection=false")
    assert count_trainable(adapter.connector) == 2 * 64  # scale and shift over the tower width
    assert count_trainable(adapter.connector) <= 0.05 * count_trainable(mlp.connector)


@pytest.fixture(scope="module")
def half_text_only_shards(tmp_path_factory) -> str:
    """Two shards of 32: one of image samples, one of text-only samples. With 2 ranks each rank
    gets one whole shard, so at every step one rank's micro-batch has no image at all."""
    import random

    from tests.helpers import image_sample, text_sample, write_tar

    folder, rng = tmp_path_factory.mktemp("mixed"), random.Random(0)
    write_tar(folder / "part-0.tar", [image_sample(rng, f"img{i:03d}") for i in range(32)])
    write_tar(folder / "part-1.tar", [text_sample(f"txt{i:03d}") for i in range(32)])
    return str(folder / "part-{0..1}.tar")


ZERO3_CASES = [
    *(" ".join([name, *EVEN_GRID.get(name, [])]) for name in sorted(CONNECTORS)),
    "ln_adapter connector.modality_norms=true",
    "cross_attention connector.resampler=perceiver",  # the resampler reads the blank image on the text-only rank
]
CASE_TIMEOUT_S = 240  # one case (a ZeRO-3 hang included) may take this long before its launch is ended


def zero3_overrides(case: str, urls: str, run_dir: str) -> list[str]:
    name, *options = case.split()
    return [
        "experiment=toy",
        f"connector={name}",
        *options,
        f"data.urls={urls}",
        f"run.dir={run_dir}",
        "parallel.zero_stage=3",
        "parallel.zero3_persistence_threshold=0",  # every parameter sharded (the toy's are all small)
        "vision.freeze=false",
        "data.num_workers=1",
        "train.micro_batch_size=4",
        "train.max_steps=8",
        "train.warmup_steps=1",
        "train.lr=2e-3",
        "train.log_every=1",
        "train.eval=false",
    ]


def launch_zero3_cases(plan: list[dict], plan_file: Path) -> tuple[int, str]:
    """This file under a 2-rank torchrun, training the plan's cases in turn; its exit code and output.
    A case that has not finished CASE_TIMEOUT_S after it started (a hung collective) ends the launch."""
    import subprocess
    import tempfile
    import time

    from tests.helpers import REPO, torchrun

    plan_file.write_text(json.dumps(plan))
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    command = torchrun(2, str(Path(__file__)), str(plan_file))
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + CASE_TIMEOUT_S
        while process.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            started = [Path(case["dir"] + ".started") for case in plan]
            latest = max((m.stat().st_mtime for m in started if m.exists()), default=0.0)
            deadline = max(deadline, latest + CASE_TIMEOUT_S)
        if process.poll() is None:
            kill_tree(process.pid)
            log.write(f"\nkilled: a case ran past {CASE_TIMEOUT_S} s\n")
        process.wait()
        log.seek(0)
        return process.returncode, log.read()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each rank in a session of its own)."""
    import contextlib

    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


@pytest.fixture(scope="module")
def zero3_runs(half_text_only_shards, tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    """Every ZeRO-3 case trained in turn by one launch (one start-up instead of six): case -> (run
    dir, None or the error). A failing case ends its launch and is charged with that launch's output;
    the cases after it run in a fresh launch, so each case passes or fails on its own."""
    root = tmp_path_factory.mktemp("zero3")
    runs = {case: root / f"case{i}" for i, case in enumerate(ZERO3_CASES)}
    errors: dict[str, str | None] = {}
    while pending := [case for case in ZERO3_CASES if case not in errors]:
        plan = [
            {"dir": str(runs[c]), "overrides": zero3_overrides(c, half_text_only_shards, str(runs[c]))} for c in pending
        ]
        code, output = launch_zero3_cases(plan, root / f"plan{len(errors)}.json")
        finished = [c for c in pending if runs[c].with_suffix(".finished").exists()]
        errors.update({case: None for case in finished})
        if code != 0 or len(finished) < len(pending):
            # the case running when the launch failed; if none was, every case of the launch
            running = [c for c in pending if c not in finished and runs[c].with_suffix(".started").exists()]
            errors.update({case: f"exit code {code}\n{failure_excerpt(output)}" for case in running or pending})
    return {case: (runs[case], errors[case]) for case in ZERO3_CASES}


def failure_excerpt(output: str) -> str:
    """A failed launch's first traceback (the root cause: its peers' errors follow it) and its last lines."""
    first = output.find("Traceback (most recent call last)")
    return (output[first : first + 3000] + "\n...\n" if first >= 0 else "") + output[-1500:]


@pytest.mark.slow
@pytest.mark.parametrize("connector", ZERO3_CASES)
def test_connector_trains_under_zero3_when_a_rank_has_no_image(connector, zero3_runs):
    """2 ranks, ZeRO-3, 8 steps; rank 1 never sees an image (half_text_only_shards). Every case
    trains in the one launch of `zero3_runs`; this checks its own."""
    from tests.helpers import step_losses

    run_dir, error = zero3_runs[connector]
    assert error is None, f"{connector}: {error}"
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, 9)), (connector, losses)
    assert (losses[7] + losses[8]) / 2 < (losses[1] + losses[2]) / 2, (connector, losses)


# --- the launched side ------------------------------------------------------------------------


def zero3_worker(plan: list[dict]) -> None:
    """Each rank trains the plan's cases in turn (the real training function, one process group);
    rank 0 marks each case started and, once both ranks are through it, finished."""
    import torch.distributed as dist

    from vlm_train.parallel.distributed import init_distributed, launch_env, shutdown
    from vlm_train.parallel.layout import Layout
    from vlm_train.train import _quiet_libraries, _train

    env = launch_env()
    _quiet_libraries(env.rank)
    device = init_distributed(compose(plan[0]["overrides"]).parallel, env)
    for case in plan:
        if env.rank == 0:
            Path(case["dir"] + ".started").touch()
        cfg = compose(case["overrides"])
        _train(cfg, Layout.from_config(cfg, world=env.world, rank=env.rank), device)
        dist.barrier()
        if env.rank == 0:
            Path(case["dir"] + ".finished").touch()
    shutdown()


if __name__ == "__main__":
    from tests.helpers import run_worker

    run_worker(zero3_worker)
