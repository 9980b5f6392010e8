"""`vlm-convert`: move models between vlm_train runs and Hugging Face checkpoints.

    vlm-convert to-hf RUN_DIR OUT [--step N]   newest (or step N) checkpoint of a run -> HF folder
    vlm-convert inspect HF_DIR                  import a LLaVA/BLIP-2/Idefics2 folder and summarise it

An mlp model exports as LlavaForConditionalGeneration; qformer and perceiver models export as
BLIP-2 and Idefics2 when their tower came from those families (see vlm_train/interop/hf.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm_train.errors import UserError


def to_hf_command(run_dir: Path, out: Path, step: int | None) -> None:
    from vlm_train.build import build_model
    from vlm_train.config import load_yaml
    from vlm_train.data.tokenizer import load_tokenizer
    from vlm_train.interop import to_hf
    from vlm_train.training.checkpoint import checkpoint_root, consolidated_state_dict, latest_checkpoint

    folder = checkpoint_root(run_dir) / f"step_{step}" if step is not None else latest_checkpoint(run_dir)
    if folder is None or not folder.is_dir():
        raise UserError(f"{run_dir} has no {'checkpoint step_' + str(step) if step else 'complete checkpoint'}")
    cfg = load_yaml(folder / "config.yaml")
    tokenizer = load_tokenizer(cfg.llm)
    model = build_model(cfg, tokenizer)
    model.load_state_dict(consolidated_state_dict(folder, cfg.parallel.zero_stage))
    to_hf(model, out, tokenizer)
    print(f"wrote {out} from {folder}")


def inspect_command(hf_dir: Path) -> None:
    from vlm_train.interop import from_hf
    from vlm_train.models.connectors import count_trainable

    model = from_hf(hf_dir)
    for name in ("vision", "connector", "llm"):
        module = getattr(model, name)
        print(f"{name:<10} {type(module).__name__:<22} {count_trainable(module):>14,} parameters")
    print(f"image token id {model.image_token_id}, {model.num_image_tokens} image tokens per image")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("to-hf", help="a run's checkpoint -> a Hugging Face folder")
    export.add_argument("run_dir", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument("--step", type=int, default=None)
    look = commands.add_parser("inspect", help="import a Hugging Face VLM folder and summarise it")
    look.add_argument("hf_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            to_hf_command(args.run_dir, args.out, args.step)
        else:
            inspect_command(args.hf_dir)
    except UserError as err:
        print(f"vlm-convert: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
