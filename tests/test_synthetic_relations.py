"""The relations task (`--layout relations`, bench/connectors.py's second task) and the pretraining
layouts (text documents for objective=lm, captions for objective=clip): answers that are right, and
words the toy tokenizer knows."""

from __future__ import annotations

import random
import re

import pytest

from vlm_train.data.synthetic import NUMBERS, POSITIONS, make_sample
from vlm_train.data.tokenizer import build_toy_tokenizer

RELATION_TESTS = {  # the relations on cell numbers, written apart from synthetic.RELATIONS
    "left of": lambda t, a: t % 3 < a % 3,
    "right of": lambda t, a: t % 3 > a % 3,
    "above": lambda t, a: t // 3 < a // 3,
    "below": lambda t, a: t // 3 > a // 3,
}


def samples(layout: str, count: int = 600) -> list[dict]:
    rng = random.Random(0)
    return [make_sample(rng, 1, layout)[1] for _ in range(count)]


def test_relation_questions_name_exactly_one_object_and_answer_its_colour():
    kinds = {}
    for record in samples("relations"):
        scene, (ask, answer) = record["scene"], record["conversations"]
        question, kind = ask["value"].removeprefix("<image>\n"), ask["kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
        assert 2 <= len(scene) <= 3
        if kind == "count":
            assert question == "how many shapes ?" and answer["value"] == NUMBERS[len(scene) - 1]
        found = re.fullmatch(r"what color is the shape (left of|right of|above|below) the (\w+) \?", question)
        if kind == "relation":
            assert found, question
            anchor = next(o for o in scene if o["shape"] == found[2])
            holds = RELATION_TESTS[found[1]]
            targets = [o for o in scene if o is not anchor and holds(o["cell"], anchor["cell"])]
            assert len(targets) == 1 and answer["value"] == targets[0]["color"], (scene, question, answer)
    assert set(kinds) == {"color", "shape", "position", "count", "relation"} and min(kinds.values()) > 80


@pytest.mark.parametrize("layout", ["relations", "text", "captions"])
def test_every_word_is_in_the_toy_vocabulary(layout):
    tokenizer = build_toy_tokenizer(relations=True)
    for record in samples(layout, 300):
        texts = [turn["value"] for turn in record.get("conversations", [])] + [record.get("text", "")]
        texts.append(record.get("caption", ""))
        for text in texts:
            ids = tokenizer(text.replace("<image>", ""), add_special_tokens=False).input_ids
            assert tokenizer.unk_token_id not in ids, text


def test_text_documents_tell_the_scene_and_cover_both_tasks():
    records = samples("text")
    kinds = {record["kind"] for record in records}
    assert kinds == {"caption", "color", "shape", "position", "count", "relation"}
    for record in records:
        caption = " and ".join(f"a {o['color']} {o['shape']} {POSITIONS[o['cell']]}" for o in record["scene"])
        assert record["text"].startswith(f"USER: {caption} . ") and " ASSISTANT: " in record["text"]
    counts = [len(record["scene"]) for record in samples("captions")]
    assert set(counts) == {1, 2, 3}


def test_relations_data_with_the_plain_toy_tokenizer_is_a_one_line_error():
    """The toy tokenizer keeps its ids (toy runs train as before); the relations words come with
    llm.tokenizer=toy-relations, after the others."""
    from vlm_train.config import compose
    from vlm_train.errors import ConfigError

    with pytest.raises(ConfigError, match="llm.tokenizer=toy-relations"):
        compose(["experiment=toy", "data.synthetic_layout=relations"])
    plain, relations = build_toy_tokenizer(), build_toy_tokenizer(relations=True)
    assert relations.get_vocab() | plain.get_vocab() == relations.get_vocab() and len(relations) == len(plain) + 9
    compose(["experiment=toy-stage1", "data.synthetic_layout=relations"])
