"""Regenerate tests/assets/tokenizers/ from llama.cpp's vocab-only GGUF files (MIT).

    .venv/bin/pip download --no-deps --no-binary llama-cpp-python -d /tmp/lcpp llama-cpp-python==0.3.36
    .venv/bin/python tests/assets/make_tokenizers.py /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz

(the argument may also be the extracted source folder). Needs the `gguf` package. Writes:

- llama2/         Llama-2's SentencePiece vocab (= Vicuna v1.5's) as transformers converts the GGUF:
                  Metaspace pre-tokenizer, prepend_scheme=first (the non-legacy normalisation);
- llama2-legacy/  the same vocab with the legacy normaliser of Meta's Llama-2-7b-hf tokenizer.json
                  (Prepend "▁" + Replace " " -> "▁", no pre-tokenizer);
- qwen2-chatml/   Qwen2's byte-level BPE with its ChatML chat template and special tokens, the merge
                  list cut to its first QWEN2_MERGES merges (ids unchanged: token id = 256 + merge
                  rank in Qwen2) to keep the file small; text whose merges all rank below the cut
                  tokenizes exactly as with the full Qwen2 tokenizer;
- qwen2-vl/       qwen2-chatml/ with Qwen2-VL's vision special tokens (<|vision_start|>, <|vision_end|>,
                  <|vision_pad|>, <|image_pad|>, <|video_pad|>, numbered after the cut vocabulary) and
                  Qwen2-VL-Instruct's chat template (QWEN2_VL_TEMPLATE); `make_qwen2_vl` alone rebuilds it
                  from qwen2-chatml/;
- llama-spm.inp / llama-spm.out   llama.cpp's test vectors for the Llama-2 vocab (made with
                  meta-llama/Llama-2-7b-hf's Hugging Face tokenizer);
- LICENSE (llama.cpp's MIT licence) and NOTICE.md (where each file comes from).

Every folder loads offline with `AutoTokenizer.from_pretrained(folder)`.
"""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tokenizers"
MODELS = "vendor/llama.cpp/models"
QWEN2_MERGES = 16384
LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}
QWEN2_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_VL_SPECIAL = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL-Instruct's chat template (its chat_template.json, Apache-2.0): an image item renders as
# <|vision_start|><|image_pad|><|vision_end|>, which the processor then expands to one pad per token.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NOTICE = """# Vendored tokenizers

Converted by `tests/assets/make_tokenizers.py` from the vocab-only GGUF files that llama.cpp ships in
`vendor/llama.cpp/models/` of the llama-cpp-python {version} source distribution (package registry),
licensed MIT (see LICENSE, llama.cpp's licence, copied from the same distribution).

| folder | source | what it is |
|---|---|---|
| llama2/ | ggml-vocab-llama-spm.gguf | Llama-2 / Vicuna v1.5 SentencePiece vocab, non-legacy (Metaspace, prepend_scheme=first) |
| llama2-legacy/ | ggml-vocab-llama-spm.gguf | the same vocab with Meta's Llama-2-7b-hf legacy normaliser |
| qwen2-chatml/ | ggml-vocab-qwen2.gguf | Qwen2 byte-level BPE, first {merges} merges, ChatML chat template |
| qwen2-vl/ | qwen2-chatml/ | the same, with Qwen2-VL's vision tokens and Qwen2-VL-Instruct's chat template (Apache-2.0) |
| llama-spm.inp/.out | ggml-vocab-llama-spm.gguf.inp/.out | llama.cpp's test vectors (Llama-2-7b-hf's HF tokenizer) |

The vocabularies themselves come from Meta's Llama 2 (Llama 2 Community License) and Alibaba's Qwen2
(Apache-2.0); llama.cpp redistributes them as tokenizer test data, and they are used here the same
way: to test tokenization, with no model weights.
"""


def source_folder(arg: str, scratch: Path) -> Path:
    """The llama-cpp-python source folder, extracting only what is needed from a tarball."""
    path = Path(arg)
    if path.is_dir():
        return path
    with tarfile.open(path) as tar:
        wanted = [
            m
            for m in tar.getmembers()
            if "/vendor/llama.cpp/models/ggml-vocab-" in m.name or m.name.endswith("/vendor/llama.cpp/LICENSE")
        ]
        tar.extractall(scratch, members=wanted, filter="data")
    return next(scratch.iterdir())


def write_compact(folder: Path, tokenizer_json: dict, config: dict) -> None:
    """tokenizer.json without indentation (a third of the size) and a trimmed tokenizer_config."""
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False, separators=(",", ":")))
    for key in ("is_local", "local_files_only"):  # save_pretrained's notes about this machine
        config.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def convert(models: Path, gguf: str, folder: Path) -> tuple[dict, dict]:
    from transformers import AutoTokenizer

    shutil.rmtree(folder, ignore_errors=True)
    AutoTokenizer.from_pretrained(str(models), gguf_file=gguf).save_pretrained(folder)
    return json.loads((folder / "tokenizer.json").read_text()), json.loads(
        (folder / "tokenizer_config.json").read_text()
    )


def make_llama2(models: Path) -> None:
    tokenizer_json, config = convert(models, "ggml-vocab-llama-spm.gguf", OUT / "llama2")
    write_compact(OUT / "llama2", tokenizer_json, {**config, "legacy": False})
    legacy = OUT / "llama2-legacy"
    shutil.rmtree(legacy, ignore_errors=True)
    legacy.mkdir()
    write_compact(
        legacy, {**tokenizer_json, "normalizer": LEGACY_NORMALIZER, "pre_tokenizer": None}, {**config, "legacy": True}
    )
    for ext in ("inp", "out"):
        shutil.copy(models / f"ggml-vocab-llama-spm.gguf.{ext}", OUT / f"llama-spm.{ext}")


def make_qwen2(models: Path) -> None:
    folder = OUT / "qwen2-chatml"
    tokenizer_json, config = convert(models, "ggml-vocab-qwen2.gguf", folder)
    model = tokenizer_json["model"]
    size = 256 + QWEN2_MERGES
    model["vocab"] = {token: i for token, i in model["vocab"].items() if i < size}
    model["merges"] = model["merges"][:QWEN2_MERGES]
    specials = [t for t in tokenizer_json["added_tokens"] if t["content"] in QWEN2_SPECIAL]
    for offset, token in enumerate(specials):  # renumbered to follow the cut vocabulary
        token["id"] = size + offset
    tokenizer_json["added_tokens"] = specials
    write_compact(folder, tokenizer_json, config)


def make_qwen2_vl() -> None:
    """qwen2-vl/ from qwen2-chatml/: the vision tokens added, Qwen2-VL's chat template."""
    source, folder = OUT / "qwen2-chatml", OUT / "qwen2-vl"
    tokenizer_json = json.loads((source / "tokenizer.json").read_text())
    config = json.loads((source / "tokenizer_config.json").read_text())
    first = 1 + max(token["id"] for token in tokenizer_json["added_tokens"])
    template = dict(tokenizer_json["added_tokens"][0])
    for offset, content in enumerate(QWEN2_VL_SPECIAL):
        tokenizer_json["added_tokens"].append({**template, "id": first + offset, "content": content})
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    write_compact(folder, tokenizer_json, config)
    (folder / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)


def main(arg: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = source_folder(arg, Path(scratch))
        models = root / MODELS
        OUT.mkdir(parents=True, exist_ok=True)
        make_llama2(models)
        make_qwen2(models)
        make_qwen2_vl()
        shutil.copy(root / "vendor/llama.cpp/LICENSE", OUT / "LICENSE")
        version = root.name.rpartition("-")[2]
        (OUT / "NOTICE.md").write_text(NOTICE.format(version=version, merges=QWEN2_MERGES))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_tokenizers.py LLAMA_CPP_PYTHON_SDIST_OR_FOLDER")
    main(sys.argv[1])
