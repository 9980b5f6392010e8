"""Preference pairs (objective=dpo): one prompt, a chosen and a rejected reply.

A sample's JSON holds the pair in one of two layouts (LLaVA-style turns, `from` human/gpt):

    {"conversations": [<human turn>, ..., <human turn>], "chosen": "reply", "rejected": "reply"}
    {"chosen": [<turns ending on gpt>], "rejected": [<turns ending on gpt>]}     (TRL's conversational)

The second's turns before the last must be the same prompt. `vlm-shards preference` writes the
first from RLAIF-V / LLaVA-RLHF / TRL records. A pair that is not one, whose replies are the same,
or whose prompts differ is a counted skip (not_a_pair, identical_pair, prompt_mismatch).
"""

from __future__ import annotations

from typing import Any


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
