"""Conversation templates reproduce LLaVA token for token, on the real Llama-2 tokenizer.

The reference below is LLaVA's own preprocessing (haotian-liu/LLaVA: llava/train/train.py
`preprocess_multimodal`, `preprocess_plain`, `preprocess_v1` at main, with its legacy branch;
llava/mm_utils.py `tokenizer_image_token`; llava/conversation.py `conv_vicuna_v1`,
`conv_llava_plain`), rewritten here from the public source, kept as close to it as a single
sample allows. `tokenizer.legacy` (the slow Llama tokenizer's flag LLaVA reads) is the flag in
the tokenizer folder's tokenizer_config.json. vlm_train must give identical input_ids and labels.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, run_cli
from vlm_train.config import LLMConfig, compose
from vlm_train.data import encode_conversation
from vlm_train.data.tokenizer import IMAGE_TOKEN, load_tokenizer

TOKENIZERS = REPO / "tests" / "assets" / "tokenizers"
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # llava/constants.py


# --- LLaVA's preprocessing, from its public source ----------------------------------------------

CONV_VICUNA_V1 = {
    "system": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "roles": ("USER", "ASSISTANT"),
    "sep": " ",
    "sep2": "</s>",
}
CONV_LLAVA_PLAIN_SEP = "\n"


def get_prompt_two(conv: dict, messages: list) -> str:
    """Conversation.get_prompt for SeparatorStyle.TWO."""
    seps = [conv["sep"], conv["sep2"]]
    ret = conv["system"] + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX):
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def preprocess_multimodal(sources):
    for source in sources:
        for sentence in source:
            if "<image>" in sentence["value"]:
                sentence["value"] = sentence["value"].replace("<image>", "").strip()
                sentence["value"] = "<image>" + "\n" + sentence["value"]
                sentence["value"] = sentence["value"].strip()
    return sources


def preprocess_v1(sources, tokenizer, legacy: bool, has_image: bool = False):
    conv = CONV_VICUNA_V1
    roles = {"human": conv["roles"][0], "gpt": conv["roles"][1]}
    conversations = []
    for i, source in enumerate(sources):
        if roles[source[0]["from"]] != conv["roles"][0]:
            source = source[1:]
        messages = []
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            assert role == conv["roles"][j % 2], f"{i}"
            messages.append([role, sentence["value"]])
        conversations.append(get_prompt_two(conv, messages))

    if has_image:
        input_ids = torch.stack([torch.tensor(tokenizer_image_token(p, tokenizer)) for p in conversations], dim=0)
    else:
        input_ids = tokenizer(conversations, return_tensors="pt", padding="longest").input_ids
    targets = input_ids.clone()

    sep = conv["sep"] + conv["roles"][1] + ": "
    for conversation, target in zip(conversations, targets):
        total_len = int(target.ne(tokenizer.pad_token_id).sum())
        rounds = conversation.split(conv["sep2"])
        cur_len = 1
        target[:cur_len] = IGNORE_INDEX
        for i, rou in enumerate(rounds):
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            if has_image:
                round_len = len(tokenizer_image_token(rou, tokenizer))
                instruction_len = len(tokenizer_image_token(parts[0], tokenizer)) - 2
            else:
                round_len = len(tokenizer(rou).input_ids)
                instruction_len = len(tokenizer(parts[0]).input_ids) - 2
            if i != 0 and not legacy:  # and IS_TOKENIZER_GREATER_THAN_0_14 (tokenizers 0.23 here)
                round_len -= 1
                instruction_len -= 1
            target[cur_len : cur_len + instruction_len] = IGNORE_INDEX
            cur_len += round_len
        target[cur_len:] = IGNORE_INDEX
        if cur_len != total_len:
            target[:] = IGNORE_INDEX  # "WARNING: tokenization mismatch"
    return dict(input_ids=input_ids, labels=targets)


def preprocess_plain(sources, tokenizer):
    conversations = []
    for source in sources:
        assert len(source) == 2
        assert "<image>" in source[0]["value"]
        source[0]["value"] = "<image>"
        conversations.append(source[0]["value"] + source[1]["value"] + CONV_LLAVA_PLAIN_SEP)
    input_ids = [torch.tensor(tokenizer_image_token(p, tokenizer)) for p in conversations]
    targets = copy.deepcopy(input_ids)
    for target, source in zip(targets, sources):
        tokenized_len = len(tokenizer_image_token(source[0]["value"], tokenizer))
        target[:tokenized_len] = IGNORE_INDEX
    return dict(input_ids=input_ids, labels=targets)


def llava_reference(turns: list[dict], tokenizer, template: str, legacy: bool) -> tuple[list[int], list[int]]:
    """LazySupervisedDataset.__getitem__ -> preprocess for one record (an image iff `<image>`)."""
    has_image = any("<image>" in t["value"] for t in turns)
    sources = [copy.deepcopy(turns)]
    if has_image:
        sources = preprocess_multimodal(sources)
    if template == "plain":
        out = preprocess_plain(sources, tokenizer)
    else:
        out = preprocess_v1(sources, tokenizer, legacy, has_image)
    return out["input_ids"][0].tolist(), out["labels"][0].tolist()


# --- conversations --------------------------------------------------------------------------------

CONVERSATIONS = {
    "multi_turn": [
        {"from": "human", "value": "<image>\nWhat is the colour of the circle?"},
        {"from": "gpt", "value": "The circle is red."},
        {"from": "human", "value": "Where is it in the picture?"},
        {"from": "gpt", "value": "It sits in the top left corner, near the edge."},
        {"from": "human", "value": "How many circles are there?"},
        {"from": "gpt", "value": "2"},
    ],
    "text_only": [
        {"from": "human", "value": "Write a haiku about rain."},
        {"from": "gpt", "value": "Soft rain on the roof\nwhispers to the sleeping town:\nlet the rivers wake."},
        {"from": "human", "value": "Now one about snow, please."},
        {"from": "gpt", "value": "White silence falling."},
    ],
    "question_then_image": [
        {"from": "human", "value": "What is in the image?\n<image>"},
        {"from": "gpt", "value": "A blue square and a yellow triangle."},
        {"from": "human", "value": "Is there anything else?"},
        {"from": "gpt", "value": "No, nothing else."},
    ],
    "unicode_and_spaces": [
        {"from": "human", "value": "  Describe <image> briefly, s'il vous plaît."},
        {"from": "gpt", "value": " Un café — 3 tasses, ☕."},
    ],
}
CAPTIONS = {
    "image_then_prompt": [
        {"from": "human", "value": "<image>\nGive a brief description of the image."},
        {"from": "gpt", "value": "a red circle top left and a blue square bottom right"},
    ],
    "prompt_then_image": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "Olive oil, 12 bottles (500 ml) – Größe: M."},
    ],
}
NORMALISATIONS = ["llama2", "llama2-legacy"]


@functools.cache  # loading costs a second or two; encoding never changes a tokenizer
def tokenizer_of(name: str):
    """The vendored tokenizer as the run loads it (gains `<image>` and a pad token), and the
    legacy flag of its tokenizer_config.json (what LLaVA reads as `tokenizer.legacy`)."""
    config = json.loads((TOKENIZERS / name / "tokenizer_config.json").read_text())
    return load_tokenizer(LLMConfig(tokenizer=str(TOKENIZERS / name))), config.get("legacy", False)


@pytest.fixture(params=NORMALISATIONS)
def llama2(request):
    return tokenizer_of(request.param)


def as_vlm_train(ids: list[int], labels: list[int], image_id: int, image_tokens: int) -> tuple[list, list]:
    """LLaVA's sequence with its image index expanded to `image_tokens` image-token ids."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        copies = image_tokens if token == IMAGE_TOKEN_INDEX else 1
        out_ids += [image_id if token == IMAGE_TOKEN_INDEX else token] * copies
        out_labels += [IGNORE_INDEX if token == IMAGE_TOKEN_INDEX else label] * copies
    return out_ids, out_labels


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("image_tokens", [1, 3])
def test_vicuna_v1_is_llava_preprocess_v1_token_for_token(llama2, name, image_tokens):
    tokenizer, legacy = llama2
    turns = CONVERSATIONS[name]
    reference = llava_reference(turns, tokenizer, "vicuna_v1", legacy)
    assert any(label != IGNORE_INDEX for label in reference[1])  # no "tokenization mismatch" in LLaVA
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    expected = as_vlm_train(*reference, image_id, image_tokens)
    got = encode_conversation(copy.deepcopy(turns), tokenizer, "vicuna_v1", image_tokens)
    assert got[0] == expected[0]
    assert got[1] == expected[1]


@pytest.mark.parametrize("name", list(CAPTIONS))
def test_plain_is_llava_preprocess_plain_token_for_token(llama2, name):
    tokenizer, legacy = llama2
    turns = CAPTIONS[name]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    expected = as_vlm_train(*llava_reference(turns, tokenizer, "plain", legacy), image_id, 4)
    assert encode_conversation(copy.deepcopy(turns), tokenizer, "plain", 4) == expected


def test_vicuna_v1_reads_as_llava_renders_it():
    """What the arithmetic above protects, in words: the system prompt, `<image>\\n` in front, the
    whole conversation tokenized once (no "▁US ER" in later rounds), answers + `</s>` supervised."""
    tokenizer, _ = tokenizer_of("llama2")
    ids, labels = encode_conversation(CONVERSATIONS["question_then_image"], tokenizer, "vicuna_v1", 1)
    text = tokenizer.decode(ids)
    assert text.startswith("<s> A chat between a curious user") and "USER: <image> \nWhat is in the image?" in text
    assert tokenizer.convert_ids_to_tokens(ids).count("▁US") == 1  # only the first round starts with "▁US ER"
    supervised = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert supervised == "A blue square and a yellow triangle.</s> No, nothing else.</s>"


def test_hf_template_supervises_exactly_the_assistant_contents_and_end_of_turn():
    tokenizer, _ = tokenizer_of("qwen2-chatml")  # Qwen2's ChatML chat_template
    turns = CONVERSATIONS["multi_turn"]
    ids, labels = encode_conversation(turns, tokenizer, "hf", image_tokens=5)
    messages = [{"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in turns]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    once = tokenizer(rendered, add_special_tokens=False).input_ids  # rendered whole, tokenized once
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids == [t for token in once for t in [token] * (5 if token == image_id else 1)]
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs, run = [*runs, run], []
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [t["value"] for t in turns if t["from"] == "gpt"]
    assert runs == [tokenizer(a, add_special_tokens=False).input_ids + [end_of_turn] for a in answers]
    prompt, prompt_labels = encode_conversation(turns[:1], tokenizer, "hf", 5, add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n") and set(prompt_labels) == {IGNORE_INDEX}


def test_llama2_legacy_normaliser_matches_llama_cpp_vectors():
    """llama.cpp's test vectors for the Llama-2 vocab (made with meta-llama/Llama-2-7b-hf's HF
    tokenizer): the legacy folder matches all; the non-legacy one differs only on leading spaces."""
    from transformers import AutoTokenizer

    texts = (TOKENIZERS / "llama-spm.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = [[int(t) for t in line.split()] for line in (TOKENIZERS / "llama-spm.out").read_text().splitlines()]
    assert len(texts) == len(expected) == 46
    legacy = AutoTokenizer.from_pretrained(TOKENIZERS / "llama2-legacy")
    assert [legacy(t, add_special_tokens=False).input_ids for t in texts] == expected
    plain = AutoTokenizer.from_pretrained(TOKENIZERS / "llama2")
    misses = [t for t, e in zip(texts, expected) if plain(t, add_special_tokens=False).input_ids != e]
    assert len(misses) == 15 and all(t.startswith(" ") for t in misses)


# --- bad input: one line, never a traceback -------------------------------------------------------


@pytest.mark.parametrize(
    "turns",
    [
        [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "<image>\nwhat?"}],
        [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}],
        [{"from": "human", "value": "<image>\nwhat?"}],
        [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}],
    ],
    ids=["gpt_first", "two_humans", "no_answer", "unknown_role"],
)
@pytest.mark.parametrize("template", ["vicuna_v1", "hf", "chat"])
def test_a_conversation_that_does_not_alternate_is_a_clear_value_error(turns, template):
    tokenizer, _ = tokenizer_of("qwen2-chatml" if template == "hf" else "llama2")
    with pytest.raises(ValueError, match=r"alternate|last turn|unknown role") as error:
        encode_conversation(turns, tokenizer, template, 1)
    assert "\n" not in str(error.value)


def test_a_conversation_that_does_not_alternate_is_a_counted_skip(tmp_path):
    import random

    from tests.helpers import TOKENIZER, TRANSFORM, image_sample, write_tar
    from vlm_train.data.pipeline import SKIP_REASONS, build_train_batches

    rng = random.Random(0)
    samples = [image_sample(rng, f"k{index}") for index in range(4)]
    for sample in samples[1::2]:
        record = json.loads(sample["json"])
        record["conversations"] = record["conversations"][::-1]  # gpt first
        sample["json"] = json.dumps(record).encode()
    write_tar(tmp_path / "part-0.tar", samples)
    cfg = compose(["experiment=toy", f"data.urls={tmp_path}/part-{{0..0}}.tar", "data.num_workers=0"]).data
    batches = build_train_batches(cfg, TOKENIZER, TRANSFORM, 9, dp_rank=0, dp_size=1, batch_size=4, seed=0)
    counts = dict(zip(SKIP_REASONS, next(batches)["skipped_by_reason"].tolist()))
    assert counts["bad_conversation"] == 2 and sum(counts.values()) == 2
    batches.close()


@pytest.mark.slow
def test_hf_template_without_a_chat_template_fails_at_start_up_in_one_line(toy_data, tmp_path):
    from tests.helpers import toy_overrides

    overrides = toy_overrides(
        toy_data, tmp_path / "run", f"llm.tokenizer={TOKENIZERS / 'llama2'}", "data.template=hf", "train.max_steps=1"
    )
    result = run_cli(overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("vlm-train: error:")]
    assert len(errors) == 1 and "data.template=hf" in errors[0] and "chat template" in errors[0], result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_vendored_tokenizers_load_offline_with_their_licence():
    from transformers import AutoTokenizer

    assert "MIT License" in (TOKENIZERS / "LICENSE").read_text()
    sizes = {p.name: p.stat().st_size for p in TOKENIZERS.rglob("*") if p.is_file()}
    assert sum(sizes.values()) < 4_000_000, sizes  # a few MB in the repository
    for name in ("llama2", "llama2-legacy", "qwen2-chatml"):
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / name)
        assert bool(tokenizer.chat_template) == (name == "qwen2-chatml")
    assert Path(REPO / "tests" / "assets" / "make_tokenizers.py").exists()


def test_the_docs_example_shows_what_the_code_does():
    text = (REPO / "docs" / "data.md").read_text()
    section = text[text.index("## Conversation templates") :]
    start = section.index("```python\n") + len("```python\n")
    block = section[start : section.index("\n```", start)]
    scope: dict = {}
    exec(compile(block, "docs/data.md", "exec"), scope)  # noqa: S102 - our own documentation
    tokenizer, ids, labels = scope["tokenizer"], scope["ids"], scope["labels"]
    comments = [line.lstrip("# ") for line in block.splitlines() if line.startswith("# ")]
    decoded = " ".join(line.strip() for line in comments[:-1]).replace("\\n", "\n")
    assert tokenizer.decode(ids) == decoded.strip('"')
    assert str([tokenizer.convert_ids_to_tokens(t) for t, l in zip(ids, labels) if l != -100]) == comments[-1]


def test_hf_template_needs_a_chat_template_when_the_encoder_is_built():
    from vlm_train.data.pipeline import SampleEncoder
    from vlm_train.data.preprocess import ImageTransform
    from vlm_train.errors import ConfigError

    cfg = compose(["experiment=toy", "data.urls=unused", "data.template=hf"]).data
    transform = ImageTransform(48, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match=r"data.template=hf needs a tokenizer with a chat template") as error:
        SampleEncoder(cfg, tokenizer_of("llama2")[0], transform, 1)
    assert "\n" not in str(error.value) and "llama2" in str(error.value)
    SampleEncoder(cfg, tokenizer_of("qwen2-chatml")[0], transform, 1)  # has one: fine
