"""The LLaVA-1.5 recipe end to end: stage 1 hands its connector to stage 2, and the export answers.

The rehearsal runs the README's own stage-1/stage-2 commands, word for word, with tiny local
checkpoint folders (a real Llama-2 tokenizer) and a few LLaVA-format records in place of the real
ones: only the paths are substituted and size overrides appended.
"""

from __future__ import annotations

import io
import json
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_cli, toy_overrides
from vlm_train.errors import ConfigError

TOKENIZERS = REPO / "tests" / "assets" / "tokenizers"
PROGRAMS = {"vlm-shards": "vlm_train.data.shards", "vlm-train": "vlm_train.train", "vlm-convert": "vlm_train.convert"}
LLAVA_KEYS = {f"model.mm_projector.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")}
# Appended to the README's commands: CPU sizes (one-sample shards keep the README's shard ranges).
SMALL = {
    "vlm-shards": ["--max-count", "1", "--workers", "1"],
    "vlm-train": [
        "data.num_workers=1",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "train.precision=fp32",
        "train.log_every=1",
    ],
    "vlm-convert": [],
}


# --- tiny stand-ins for CLIP ViT-L/14-336 and Vicuna-7B v1.5 -----------------------------------


def tiny_checkpoints(root: Path, tokenizer_name: str = "llama2") -> dict[str, Path]:
    """A tiny CLIP tower and a tiny Llama with a real tokenizer, saved as HF checkpoint folders."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    vision, llm = root / "clip", root / "vicuna"
    clip = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14
    )
    CLIPVisionModel(clip).save_pretrained(vision)
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(vision)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / tokenizer_name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(config).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    return {"vision": vision, "llm": llm}


def scene_jpeg(rng: random.Random, size: tuple[int, int]) -> tuple[bytes, str]:
    """A synthetic scene (vlm_train.data.synthetic) as JPEG bytes of `size`, and its caption."""
    from vlm_train.data.synthetic import caption, make_scene, render

    scene = make_scene(rng)
    buffer = io.BytesIO()
    render(scene, rng).resize(size).save(buffer, format="JPEG")
    return buffer.getvalue(), caption(scene)


def write_llava_data(data: Path, pretrain: int, instruct: int) -> None:
    """LLaVA's files, in its layout: LLaVA-Pretrain/ (LCS-558K captions, plain template) and
    llava_v1_5_mix665k.json (multi-turn conversations over image folders, some text-only)."""
    rng = random.Random(0)
    records = []
    prompts = [
        "<image>\nGive a brief description of the image.",
        "Render a clear and concise summary of the photo.\n<image>",
    ]
    for i in range(pretrain):
        image, text = scene_jpeg(rng, (40, 40))
        name = f"{i // 10:05d}/{i:09d}.jpg"
        (data / "LLaVA-Pretrain" / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (data / "LLaVA-Pretrain" / "images" / name).write_bytes(image)
        turns = [{"from": "human", "value": prompts[i % 2]}, {"from": "gpt", "value": text}]
        records.append({"id": f"{i:09d}", "image": name, "conversations": turns})
    (data / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    records = []
    for i in range(instruct):
        if i % 10 == 9:  # ShareGPT-style text-only conversations are part of the mix
            turns = [
                {"from": "human", "value": "Write a haiku about rain."},
                {"from": "gpt", "value": "Soft rain falls."},
            ]
            records.append({"id": f"sharegpt-{i}", "conversations": turns})
            continue
        image, text = scene_jpeg(rng, (48, 36) if i % 2 else (36, 48))  # non-square: data.image_aspect_ratio=pad
        name = f"coco/train2017/{i:012d}.jpg"
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_bytes(image)
        question = "What is in the image?\n<image>" if i % 3 == 0 else "<image>\nWhat is in the image?"
        turns = [
            {"from": "human", "value": question},
            {"from": "gpt", "value": f"There is {text}."},
            {"from": "human", "value": "Is there anything else?"},
            {"from": "gpt", "value": "No, nothing else."},
        ]
        records.append({"id": f"{i:012d}", "image": name, "conversations": turns})
    (data / "llava_v1_5_mix665k.json").write_text(json.dumps(records))


# --- the README's commands ---------------------------------------------------------------------


def readme_commands() -> list[list[str]]:
    """The commands of the README's stage-1/stage-2 block, each as the shell would split it."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### LLaVA-1.5: stage 1, then stage 2") :]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start : section.index("\n```", start)]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def localised(command: list[str], root: Path, tiny: dict[str, Path]) -> list[str]:
    """The command with the tiny checkpoints and local data in place of the real ones, run as
    `python -m <module>`, with the CPU-size arguments appended."""
    program, *args = command
    replaced = []
    for arg in args:
        arg = re.sub(r"(^|=)/models/clip-vit-large-patch14-336(?=/|$)", rf"\g<1>{tiny['vision']}", arg)
        arg = re.sub(r"(^|=)/models/vicuna-7b-v1\.5(?=/|$)", rf"\g<1>{tiny['llm']}", arg)
        replaced.append(re.sub(r"(^|=)/data(?=/|$)", rf"\g<1>{root / 'data'}", arg))
    return [sys.executable, "-m", PROGRAMS[program], *replaced, *SMALL[program]]


def run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{shlex.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout


# --- connector.path ------------------------------------------------------------------------------


def _mlp(seed: int):
    from vlm_train.models.connectors.mlp import MLPConnector

    torch.manual_seed(seed)
    return MLPConnector(8, 16, depth=2, num_patches=4)


def test_connector_path_takes_each_form_stage_1_leaves(tmp_path):
    """LLaVA's mm_projector.bin, a connector.safetensors, a run dir, a consolidate folder."""
    from safetensors.torch import save_file

    from vlm_train.models.connectors import load_connector_weights

    trained = _mlp(1).state_dict()
    run_dir, merged = tmp_path / "run", tmp_path / "merged"
    run_dir.mkdir(), merged.mkdir()
    torch.save({f"model.mm_projector.{k}": v.bfloat16() for k, v in trained.items()}, tmp_path / "mm_projector.bin")
    save_file(trained, str(tmp_path / "connector.safetensors"))
    save_file(trained, str(run_dir / "connector.safetensors"))
    whole = {f"connector.{k}": v for k, v in trained.items()} | {"llm.lm_head.weight": torch.zeros(3, 16)}
    save_file(whole, str(merged / "model.safetensors"))
    for path, exact in [
        (tmp_path / "mm_projector.bin", False),  # LLaVA saves the bf16 module copy
        (tmp_path / "connector.safetensors", True),
        (run_dir, True),
        (merged, True),
    ]:
        connector = _mlp(2)
        load_connector_weights(connector, str(path))
        for key, value in trained.items():
            expected = value.bfloat16().float() if not exact else value
            torch.testing.assert_close(connector.state_dict()[key], expected, rtol=0, atol=0, msg=str(path))


def test_connector_path_refuses_what_does_not_fit(tmp_path):
    from safetensors.torch import save_file

    from vlm_train.models.connectors import load_connector_weights

    trained = _mlp(1).state_dict()
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not weights")
    for path in (tmp_path / "missing.bin", tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(ConfigError, match="expected LLaVA's mm_projector.bin, a connector.safetensors") as err:
            load_connector_weights(_mlp(2), str(path))
        assert "\n" not in str(err.value)
    partial = {k: v for k, v in trained.items() if k != "2.bias"}  # a depth or key mismatch
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConfigError, match=r"does not fit connector: missing \['2.bias'\]"):
        load_connector_weights(_mlp(2), str(tmp_path / "partial.safetensors"))
    wider = dict(trained, **{"2.bias": torch.zeros(32)})
    save_file(wider, str(tmp_path / "wider.safetensors"))
    with pytest.raises(ConfigError, match=r"2.bias \(32,\) \(connector has \(16,\)\)"):
        load_connector_weights(_mlp(2), str(tmp_path / "wider.safetensors"))


@pytest.mark.parametrize("name", ["mlp", "qformer", "perceiver", "cross_attention", "ln_adapter"])
def test_every_connector_starts_stage_2_from_its_connector_safetensors(name, tmp_path):
    """What a run writes (connector_state -> connector.safetensors) is what connector.path loads."""
    from safetensors.torch import save_file

    from vlm_train import build_model, compose
    from vlm_train.training.connector_files import CONNECTOR_FILE, connector_state

    torch.manual_seed(1)
    trained = build_model(compose(["experiment=toy", f"connector={name}"])).connector
    save_file(connector_state(trained), str(tmp_path / CONNECTOR_FILE))
    torch.manual_seed(2)
    started = build_model(compose(["experiment=toy", f"connector={name}", f"connector.path={tmp_path}"])).connector
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(started.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_connector_files_are_gathered_under_zero3(toy_data, tmp_path):
    """2 ranks, ZeRO-3 (the connector partitioned): the run dir's files hold the whole trained
    connector of the last checkpoint, as `vlm-convert consolidate` reads it from the shards."""
    from safetensors.torch import load_file

    from vlm_train.parallel.engine_checkpoint import consolidated_state_dict
    from vlm_train.training.checkpoint import latest_checkpoint

    run_dir = tmp_path / "run"
    result = run_cli(toy_overrides(toy_data, run_dir, "parallel.zero_stage=3", "train.max_steps=3"), nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    consolidated = consolidated_state_dict(latest_checkpoint(run_dir), zero_stage=3)
    files = load_file(str(run_dir / "connector.safetensors"))
    projector = torch.load(run_dir / "mm_projector.bin", weights_only=True)
    assert set(projector) == LLAVA_KEYS
    for key, value in files.items():
        torch.testing.assert_close(value, consolidated[f"connector.{key}"], rtol=0, atol=0)
        torch.testing.assert_close(projector[f"model.mm_projector.{key}"], value, rtol=0, atol=0)


# --- the export's processor ----------------------------------------------------------------------

CONVERSATIONS = [
    [{"from": "human", "value": "What is in the image?\n<image>"}, {"from": "gpt", "value": "A cat."}],
    [
        {"from": "human", "value": "<image>\nWhat colour is it?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "And the shape?"},
        {"from": "gpt", "value": "A circle, top left."},
    ],
    [{"from": "human", "value": "Write a haiku about rain."}, {"from": "gpt", "value": "Soft rain falls."}],
]


def _messages(turns: list[dict], image=None) -> list[dict]:
    """LLaVA turns as transformers' chat messages (an image entry where `<image>` was)."""
    messages = []
    for turn in turns:
        content = [{"type": "image", "image": image}] * turn["value"].count("<image>")
        content.append({"type": "text", "text": turn["value"].replace("<image>", "").strip()})
        messages.append({"role": "user" if turn["from"] == "human" else "assistant", "content": content})
    return messages


@pytest.mark.parametrize("tokenizer_name", ["llama2", "llama2-legacy"])
def test_export_ships_a_processor_that_prompts_as_training_did(tmp_path, tokenizer_name):
    """to_hf with the tokenizer -> AutoProcessor: its chat template renders vicuna_v1 and plain
    conversations into the ids vlm_train trains on (both normalisations of Llama-2's tokenizer)."""
    from PIL import Image
    from transformers import AutoProcessor

    from vlm_train import build_model, compose
    from vlm_train.data import encode_conversation
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.interop import to_hf

    tiny = tiny_checkpoints(tmp_path, tokenizer_name)
    cfg = compose(
        ["experiment=llava15-7b-stage1", f"vision.path={tiny['vision']}", f"llm.path={tiny['llm']}", "data.urls=x"]
    )
    tokenizer = load_tokenizer(cfg.llm)
    model = build_model(cfg, tokenizer)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    for template, aspect in (("vicuna_v1", "pad"), ("plain", "crop")):
        to_hf(model, tmp_path / template, tokenizer, template=template, image_aspect_ratio=aspect)
        processor = AutoProcessor.from_pretrained(tmp_path / template)
        assert processor.image_processor.do_pad == (aspect == "pad")
        conversations = (
            CONVERSATIONS if template == "vicuna_v1" else [[{"from": "human", "value": "<image>"}, CONVERSATIONS[0][1]]]
        )
        for turns in conversations:
            for prompt in (True, False):
                shown = turns[:-1] if prompt else turns
                if template == "plain" and prompt:
                    continue  # stage 1 has no questions to prompt with
                expected, _ = encode_conversation(shown, tokenizer, template, model.num_image_tokens, prompt)
                messages = _messages(shown, image)
                got = processor.apply_chat_template(
                    messages, add_generation_prompt=prompt, tokenize=True, return_dict=True
                )
                text = processor.apply_chat_template(messages, add_generation_prompt=prompt)
                assert list(got["input_ids"][0]) == expected, f"{template}: {text!r}"


# --- the rehearsal -------------------------------------------------------------------------------


@pytest.mark.slow
def test_readme_llava_recipe_stage1_to_stage2_to_transformers(tmp_path, monkeypatch):
    """README block as written: shards -> stage 1 -> stage 2 from its connector -> to-hf, whose
    processor and pipeline answer a held-out question as vlm_train's evaluation does."""
    from safetensors.torch import load_file

    from vlm_train.config import load_yaml
    from vlm_train.parallel.engine_checkpoint import consolidated_state_dict
    from vlm_train.training.checkpoint import latest_checkpoint

    tiny = tiny_checkpoints(tmp_path / "models")
    write_llava_data(tmp_path / "data", pretrain=56, instruct=67)  # one shard each: the README's ranges
    commands = readme_commands()
    monkeypatch.chdir(tmp_path)  # the README's relative runs/ and exports/, for the commands and this test
    assert [c[0] for c in commands] == ["vlm-shards", "vlm-shards", "vlm-train", "vlm-train", "vlm-convert"]
    for command in commands[:3]:
        run(localised(command, tmp_path, tiny), cwd=tmp_path)

    stage1 = tmp_path / "runs" / "llava15-7b-stage1"
    projector = torch.load(stage1 / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert set(projector) == LLAVA_KEYS  # LLaVA's `get_mm_adapter_state_maybe_zero_3` keys
    connector = load_file(str(stage1 / "connector.safetensors"))
    final = consolidated_state_dict(latest_checkpoint(stage1), zero_stage=2)  # the last step's weights
    initial = _initial_connector(load_yaml(stage1 / "config.yaml"))
    for key, value in connector.items():
        torch.testing.assert_close(projector[f"model.mm_projector.{key}"], value, rtol=0, atol=0)
        torch.testing.assert_close(final[f"connector.{key}"], value, rtol=0, atol=0)
        assert not torch.equal(initial[key], value), f"{key} did not train in stage 1"

    run(localised(commands[3], tmp_path, tiny), cwd=tmp_path)
    stage2 = tmp_path / "runs" / "llava15-7b-stage2"
    cfg2 = load_yaml(stage2 / "config.yaml")
    assert cfg2.data.template == "vicuna_v1" and cfg2.parallel.zero_stage == 3
    # The model stage 2 built, before any step, from its own resolved config: stage 1's connector, bit for bit.
    started = _initial_connector(cfg2)
    for key, value in connector.items():
        torch.testing.assert_close(started[key], value, rtol=0, atol=0)

    run(localised(commands[4], tmp_path, tiny), cwd=tmp_path)
    _export_answers_as_vlm_train(tmp_path / "exports" / "llava-v1.5-7b", latest_checkpoint(stage2))


def _initial_connector(cfg) -> dict[str, torch.Tensor]:
    """The connector a run of `cfg` starts from (built as train.py builds it: same seed)."""
    from vlm_train import build_model
    from vlm_train.train import seed_everything

    seed_everything(cfg.run.seed)
    return {k: v.clone() for k, v in build_model(cfg).connector.state_dict().items()}


def _export_answers_as_vlm_train(export: Path, checkpoint: Path) -> None:
    """The export's processor prepares the prompt and pixels vlm_train's evaluation prepares, and
    `pipeline("image-text-to-text")` gives the same greedy answer."""
    from PIL import Image
    from transformers import AutoProcessor, pipeline

    from vlm_train.convert import rebuild_trained_model
    from vlm_train.data.pipeline import SampleEncoder
    from vlm_train.data.preprocess import ImageTransform
    from vlm_train.training.evaluate import greedy_generate, questions_of

    processor = AutoProcessor.from_pretrained(export)
    assert type(processor).__name__ == "LlavaProcessor"
    assert type(processor.image_processor).__name__.startswith("LlavaImageProcessor")
    assert processor.image_processor.do_pad  # stage 2's data.image_aspect_ratio=pad
    assert (processor.patch_size, processor.vision_feature_select_strategy) == (14, "default")
    assert processor.num_additional_image_tokens == 1 and processor.chat_template

    cfg, tokenizer, model = rebuild_trained_model(checkpoint)
    model.eval()
    vision = model.vision
    encoder = SampleEncoder(
        cfg.data,
        tokenizer,
        ImageTransform(vision.image_size, vision.image_mean, vision.image_std),
        model.num_image_tokens,
    )
    image_bytes, _ = scene_jpeg(random.Random(7), (52, 40))
    record = {
        "conversations": [{"from": "human", "value": "What is in the image?\n<image>"}, {"from": "gpt", "value": "?"}]
    }
    (question,) = questions_of({"json": json.dumps(record).encode(), "jpg": image_bytes}, encoder)
    (ours,) = greedy_generate(
        model,
        question.pixels,
        [question.prompt],
        cfg.data.max_new_tokens,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        torch.device("cpu"),
    )
    assert ours, "vlm_train's evaluation answered nothing: the comparison would be empty"

    image = Image.open(io.BytesIO(image_bytes))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is in the image?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["input_ids"][0].tolist() == question.prompt  # the chat template renders vicuna_v1 as training did
    pixels = vision.normalize(question.pixels)
    torch.testing.assert_close(inputs["pixel_values"], pixels, rtol=0, atol=1e-5)

    answer = pipeline("image-text-to-text", model=str(export))(
        text=messages,
        max_new_tokens=cfg.data.max_new_tokens,
        generate_kwargs={"do_sample": False},
        return_full_text=False,
    )[0]["generated_text"]
    said = " ".join(tokenizer.decode(ours, skip_special_tokens=True).split())
    assert " ".join(answer.split()) == said
