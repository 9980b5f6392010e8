"""LoRA updates as a PEFT adapter: `vlm-convert to-hf RUN OUT --lora adapter` writes the base model to
OUT (its LoRA'd layers at their base weights, everything else as trained) and the updates to
OUT/lora (adapter_config.json, adapter_model.safetensors), which `peft.PeftModel.from_pretrained`
puts on the base: the trained model's logits. The default (`--lora merge`) folds them into the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from vlm_train.errors import ConfigError
from vlm_train.models.lora import LoRA

ADAPTER_FOLDER = "lora"


def save_peft_adapter(hf_model: nn.Module, updates: list[tuple[nn.Linear, LoRA]], folder: str | Path) -> None:
    """`updates` (taken off the layers that now sit in `hf_model`) as PEFT's LoRA adapter in `folder`,
    each under its layer's name in `hf_model`."""
    from safetensors.torch import save_file

    names = {id(module): name for name, module in hf_model.named_modules()}
    missing = [linear for linear, _ in updates if id(linear) not in names]
    if missing:
        raise ConfigError(f"{len(missing)} LoRA layers are not part of the exported model: export with --lora merge")
    tensors, ranks, alphas = {}, {}, {}
    for linear, lora in updates:
        name = names[id(linear)]
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora.lora_A.weight.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora.lora_B.weight.detach().float().contiguous().cpu()
        ranks[name] = lora.lora_A.weight.shape[0]
        alphas[name] = lora.scaling * ranks[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(_adapter_config(updates, ranks, alphas), indent=1))


def _adapter_config(updates: list[tuple[nn.Linear, LoRA]], ranks: dict, alphas: dict) -> dict:
    """PEFT's LoraConfig: every layer by its full name; ranks and alphas per layer where they differ."""
    rank, alpha = _most_common(list(ranks.values())), _most_common(list(alphas.values()))
    dropout = next((m.p for _, lora in updates for m in lora.modules() if isinstance(m, nn.Dropout)), 0.0)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(ranks),
        "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }


def _most_common(values: list) -> object:
    return max(set(values), key=values.count)
