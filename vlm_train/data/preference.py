"""Preference pairs (objective=dpo): one prompt, a chosen and a rejected reply.

A sample's JSON holds the pair in one of two layouts (LLaVA-style turns, `from` human/gpt):

    {"conversations": [<human turn>, ..., <human turn>], "chosen": "reply", "rejected": "reply"}
    {"chosen": [<turns ending on gpt>], "rejected": [<turns ending on gpt>]}     (TRL's conversational)

The second's turns before the last must be the same prompt. `vlm-shards preference` writes the
first from RLAIF-V / LLaVA-RLHF / TRL records. A pair that is not one, whose replies are the same,
or whose prompts differ is a counted skip (not_a_pair, identical_pair, prompt_mismatch).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from vlm_train.data.reader import SkippedSample, skipped


class PairError(ValueError):
    """A sample that is no usable preference pair; `reason` is its SKIP_REASONS entry."""

    def __init__(self, reason: str, why: str):
        super().__init__(why)
        self.reason = reason


def preference_turns(record: dict[str, Any]) -> tuple[list[dict], dict, dict]:
    """(prompt turns, chosen reply turn, rejected reply turn) of a preference record."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt = record.get("conversations")
        if not isinstance(prompt, list) or not prompt:
            raise PairError("not_a_pair", "string replies need the prompt's turns in 'conversations'")
        pair = ({"from": "gpt", "value": chosen}, {"from": "gpt", "value": rejected})
    elif isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected:
        if chosen[:-1] != rejected[:-1]:
            raise PairError("prompt_mismatch", "the chosen and rejected conversations have different prompts")
        prompt, pair = chosen[:-1], (chosen[-1], rejected[-1])
    else:
        raise PairError("not_a_pair", "no 'chosen' and 'rejected' replies (strings, or turn lists)")
    if pair[0].get("value") == pair[1].get("value"):
        raise PairError("identical_pair", "the chosen and rejected replies are the same")
    return prompt, pair[0], pair[1]


def encode_pair(encoder: Any, raw: dict) -> tuple[str, Any, Any] | SkippedSample:
    """A raw preference sample through `encoder` (a SampleEncoder): the prompt with each reply, encoded
    as any sample is (media, template, budget, truncation); the chosen one carries the rejected one
    (`Encoded.rejected`), or the skip that stopped either."""
    key, text_key = raw.get("__key__", "?"), encoder.cfg.text_key
    try:
        prompt, chosen, rejected = preference_turns(json.loads(raw[text_key]))
    except PairError as err:
        return skipped(err.reason, key, str(err))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return skipped("not_a_pair", key, f"no preference pair in '{text_key}' ({err})")
    results = []
    for reply in (chosen, rejected):
        result = encoder.encode_one({**raw, text_key: json.dumps({"conversations": [*prompt, reply]}).encode()})
        if isinstance(result, SkippedSample):
            return result
        results.append(result)
    (_, pixels, encoded), (_, _, encoded_rejected) = results
    return key, pixels, replace(encoded, rejected=encoded_rejected)
