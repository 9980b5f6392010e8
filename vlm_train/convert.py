"""`vlm-convert`: move models between vlm_train runs and Hugging Face checkpoints.

    vlm-convert to-hf RUN_DIR OUT [--step N] [--lora merge|adapter]
                                                newest (or step N) checkpoint of a run -> HF folder, with
                                                its processor (image processor, tokenizer, chat template of
                                                the run's data.template) for AutoProcessor and pipeline();
                                                LoRA updates merged, or a PEFT adapter in OUT/lora
    vlm-convert consolidate RUN_DIR OUT [--step N]
                                                the same checkpoint (any ZeRO stage, TP size) -> one
                                                OUT/model.safetensors (frozen weights included) + config.yaml;
                                                connector.path=OUT starts a run from its connector
    vlm-convert from-hf HF_DIR OUT              a HF VLM -> tower, decoder and connector files in OUT,
                                                and prints the overrides that train from them
    vlm-convert inspect HF_DIR                  import a LLaVA/BLIP-2/Idefics2 folder and summarise it

An mlp model exports as LlavaForConditionalGeneration; qformer and perceiver models export as
BLIP-2 and Idefics2 when their tower came from those families (see vlm_train/interop/hf.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_train.errors import UserError, report


def to_hf_command(run_dir: Path, out: Path, step: int | None, lora: str = "merge") -> None:
    from vlm_train.interop import to_hf

    folder = run_checkpoint(run_dir, step)
    cfg, tokenizer, model = rebuild_trained_model(folder)
    # The processor prepares prompts and images as this run's data pipeline did.
    to_hf(model, out, tokenizer, template=cfg.data.template, image_aspect_ratio=cfg.data.image_aspect_ratio, lora=lora)
    print(
        f"wrote {out} from {folder}" + (f" (LoRA updates as a PEFT adapter in {out}/lora)" if lora == "adapter" else "")
    )


def consolidate_command(run_dir: Path, out: Path, step: int | None) -> None:
    """A sharded checkpoint (any ZeRO stage or TP size) -> one model.safetensors + config.yaml."""
    import shutil

    from safetensors.torch import save_file

    folder = run_checkpoint(run_dir, step)
    _, _, model = rebuild_trained_model(folder)
    out.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage; safetensors stores each tensor once, so copy them apart.
    state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"source": str(folder)})
    shutil.copy(folder / "config.yaml", out / "config.yaml")
    print(f"wrote {out / 'model.safetensors'} ({len(state)} tensors) from {folder}")


def run_checkpoint(run_dir: Path, step: int | None) -> Path:
    """The newest complete checkpoint of a run, or its step N."""
    from vlm_train.training.checkpoint import checkpoint_root, latest_checkpoint

    folder = checkpoint_root(run_dir) / f"step_{step}" if step is not None else latest_checkpoint(run_dir)
    if folder is None or not folder.is_dir():
        raise UserError(f"{run_dir} has no {'checkpoint step_' + str(step) if step else 'complete checkpoint'}")
    return folder


def rebuild_trained_model(folder: Path):
    """(config, tokenizer, model) of a checkpoint: frozen weights rebuilt from their source as the
    run built them (same seed), trained ones from the checkpoint; the frozen checksum is verified."""
    from vlm_train.build import build_model
    from vlm_train.config import load_yaml
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.parallel.engine_checkpoint import consolidated_state_dict
    from vlm_train.train import seed_everything
    from vlm_train.training.checkpoint import load_trained_weights
    from vlm_train.training.frozen import check_rebuilt_frozen_weights

    cfg = load_yaml(folder / "config.yaml")
    tokenizer = load_tokenizer(cfg.llm, video=cfg.data.video)
    seed_everything(cfg.run.seed)  # a randomly initialised frozen part is rebuilt exactly
    if cfg.llm.backend == "megatron":
        from vlm_train.interop.tp_checkpoint import CheckpointReaders, load_tp_checkpoint
        from vlm_train.parallel.engine_checkpoint import safe_torch_load

        cfg.llm.backend = "hf"  # the same model with the HF decoder: its TP shards are joined into it
        lora = cfg.llm.lora
        scaling = lora.alpha / lora.rank if lora.rank else 0.0
        lora.rank = 0  # the decoder's LoRA slices are merged into the joined weights
        model = build_model(cfg, tokenizer)  # (its frozen checksum was taken over megatron's layout)
        readers = CheckpointReaders(safe_torch_load, consolidated_state_dict)  # interop reads no DeepSpeed file itself
        load_tp_checkpoint(model, folder, cfg.parallel.zero_stage, cfg.parallel.tensor_parallel, readers, scaling)
    else:
        model = build_model(cfg, tokenizer)
        check_rebuilt_frozen_weights(model, folder)
        load_trained_weights(model, consolidated_state_dict(folder, cfg.parallel.zero_stage))
    return cfg, tokenizer, model


def from_hf_command(hf_dir: Path, out: Path) -> None:
    """Split a HF VLM into the pieces vlm-train's configs load, and print the overrides (a Qwen-VL
    folder trains as it is: only the overrides)."""
    from safetensors.torch import save_file
    from transformers import PreTrainedModel

    from vlm_train.interop import from_hf
    from vlm_train.interop.qwen_vl import qwen_vl_overrides

    qwen = qwen_vl_overrides(hf_dir)
    if qwen is not None:
        print(
            f"note: a Qwen-VL folder trains as it is (vision.path = llm.path); nothing written to {out}",
            file=sys.stderr,
        )
        print(" ".join(qwen))
        return

    model = from_hf(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    for part, hf_model in (("vision", model.vision.hf_model), ("llm", model.llm.hf_model)):
        assert isinstance(hf_model, PreTrainedModel)  # from_hf builds both from HF classes
        hf_model.save_pretrained(out / part)
    _copy_tokenizer(hf_dir, out / "llm")
    save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()}, str(out / "connector.safetensors"))
    print(" ".join(connector_overrides(model, out)))


def connector_overrides(model, out: Path) -> list[str]:
    """The overrides that rebuild `model` from the pieces in `out` (vlm-train resizes nothing)."""
    vision, connector = model.vision, model.connector
    overrides = [
        f"vision.family={vision.family}",
        f"vision.path={out / 'vision'}",
        f"vision.select_layer={vision.select_layer}",
        f"vision.drop_cls={str(vision.drop_cls).lower()}",
        f"llm.path={out / 'llm'}",
        f"llm.tokenizer={out / 'llm'}",
        f"connector={type(connector).__name__.removesuffix('Connector').lower()}",
        f"connector.path={out / 'connector.safetensors'}",
    ]
    if overrides[-2] == "connector=qformer":
        q = connector.qformer.config
        overrides += [
            f"connector.num_queries={connector.num_tokens}",
            f"connector.hidden_size={q.hidden_size}",
            f"connector.num_layers={q.num_hidden_layers}",
            f"connector.num_heads={q.num_attention_heads}",
            f"connector.intermediate_size={q.intermediate_size}",
            f"connector.cross_attention_freq={q.cross_attention_frequency}",
        ]
    elif overrides[-2] == "connector=perceiver":
        p = connector.perceiver_resampler.config
        overrides += [
            f"connector.num_latents={p.resampler_n_latents}",
            f"connector.depth={p.resampler_depth}",
            f"connector.num_heads={p.resampler_n_heads}",
            f"connector.head_dim={p.resampler_head_dim}",
            f"connector.num_kv_heads={p.num_key_value_heads}",
            f"connector.intermediate_size={connector.modality_projection.gate_proj.out_features}",
        ]
    return overrides


def _copy_tokenizer(hf_dir: Path, target: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(hf_dir).save_pretrained(target)
    except (OSError, ValueError, TypeError):
        print(f"note: {hf_dir} has no tokenizer; give llm.tokenizer=... when training", file=sys.stderr)


def inspect_command(hf_dir: Path) -> None:
    from vlm_train.interop import from_hf
    from vlm_train.models.connectors import count_trainable

    model = from_hf(hf_dir)
    for name in ("vision", "connector", "llm"):
        module = getattr(model, name)
        print(f"{name:<10} {type(module).__name__:<22} {count_trainable(module):>14,} parameters")
    per = "per 28 px merge unit (native resolution)" if model.native_resolution else "per image"
    print(f"image token id {model.image_token_id}, {model.num_image_tokens} image tokens {per}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("to-hf", help="a run's checkpoint -> a Hugging Face folder")
    export.add_argument("run_dir", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--step", type=int, default=None)
    export.add_argument(
        "--lora", choices=("merge", "adapter"), default="merge",
        help="LoRA updates merged into the weights, or the base model + a PEFT adapter in OUT/lora",
    )  # fmt: skip
    merge = commands.add_parser("consolidate", help="a run's sharded checkpoint -> one safetensors folder")
    merge.add_argument("run_dir", type=Path)
    merge.add_argument("out", type=Path)
    merge.add_argument("--step", type=int, default=None)
    split = commands.add_parser("from-hf", help="a Hugging Face VLM -> pieces vlm-train loads (+ overrides)")
    split.add_argument("hf_dir", type=Path)
    split.add_argument("out", type=Path)
    look = commands.add_parser("inspect", help="import a Hugging Face VLM folder and summarise it")
    look.add_argument("hf_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            to_hf_command(args.run_dir, args.out, args.step, args.lora)
        elif args.command == "consolidate":
            consolidate_command(args.run_dir, args.out, args.step)
        elif args.command == "from-hf":
            from_hf_command(args.hf_dir, args.out)
        else:
            inspect_command(args.hf_dir)
    except UserError as err:
        return report("vlm-convert", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
