"""The end of a pretraining run (objective=lm | clip | siglip): its held-out score, and the trained part
written as a Hugging Face folder that a VLM run loads (`llm.path` / `vision.path`).

- lm: held-out perplexity (eval_loss, eval_perplexity) of the text documents;
- clip, siglip: zero-shot retrieval on held-out image-caption pairs: the share of images whose most
  similar caption is theirs (image->text R@1) and of captions whose most similar image is theirs
  (text->image), a caption counting as theirs when its text is the same (scenes can share captions);
  `eval_retrieval_chance` is what picking at random would score.

Every rank scores every held-out sample (the same forwards everywhere: ZeRO-3's gathers stay in step).
`<run.dir>/hf`: the decoder (a transformers causal LM + the tokenizer) or the CLIPModel / SiglipModel
(+ its image processor's size, mean and std), written by rank 0 from the trained fp32 weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vlm_train.data.samples import collate
from vlm_train.models.dual_encoder import DualEncoder, hf_state_dict
from vlm_train.models.language_model import LanguageModel
from vlm_train.models.vlm import VisionLanguageModel
from vlm_train.training.connector_files import connector_state
from vlm_train.training.flops import TrainingFlops

HF_FOLDER = "hf"


@dataclass(frozen=True)
class PretrainingFlops:
    """Training FLOPs of a micro-batch, 6 per weight per token (attention's T^2 term left out):
    text tokens through `text_weights`, and for each image `image_tokens` through `image_weights`."""

    text_weights: int
    image_weights: int = 0
    image_tokens: int = 0

    @classmethod
    def of(cls, model: LanguageModel | DualEncoder) -> PretrainingFlops:
        if isinstance(model, LanguageModel):
            return cls(sum(p.numel() for p in model.llm.parameters()))
        hf = model.hf_model
        config = hf.config.vision_config
        return cls(
            sum(p.numel() for p in hf.text_model.parameters()),
            sum(p.numel() for p in hf.vision_model.parameters()),
            (config.image_size // config.patch_size) ** 2 + 1,
        )

    def __call__(self, batch: dict) -> float:
        tokens = float((batch["attention_mask"] > 0).sum())
        return 6.0 * (self.text_weights * tokens + self.image_weights * self.visual_tokens(batch))

    def visual_tokens(self, batch: dict) -> int:
        return int(batch["pixel_values"].shape[0]) * self.image_tokens if self.image_weights else 0


def flops_of(model: torch.nn.Module) -> TrainingFlops | PretrainingFlops:
    """The FLOPs counter of a VLM (training/flops.py) or of a pretraining objective's model."""
    if isinstance(model, (LanguageModel, DualEncoder)):
        return PretrainingFlops.of(model)
    assert isinstance(model, VisionLanguageModel)
    return TrainingFlops.of(model)


def encoded_eval_samples(trainer, cfg, encoder) -> list:
    from vlm_train.data.pipeline import read_eval_records

    assert cfg.data.eval_urls  # the caller checked
    return [sample for sample in map(encoder, read_eval_records(cfg.data.eval_urls, cfg.data.eval_samples)) if sample]


def evaluate_perplexity(trainer, cfg, encoder) -> dict[str, float]:
    """objective=lm: token-weighted held-out loss and its perplexity."""
    samples, model = encoded_eval_samples(trainer, cfg, encoder), trainer.engine.module
    loss_sum, tokens = 0.0, 0.0
    with torch.no_grad(), _evaluating(model):
        for start in range(0, len(samples), cfg.train.micro_batch_size):
            batch = collate(samples[start : start + cfg.train.micro_batch_size], encoder.tokenizer.pad_token_id)
            out = model(**trainer.model_inputs(batch))
            loss_sum, tokens = loss_sum + float(out.loss_sum), tokens + float(out.num_label_tokens)
    loss = loss_sum / max(tokens, 1.0)
    return {"step": trainer.step, "eval_loss": loss, "eval_perplexity": math.exp(loss), "eval_samples": len(samples)}


def evaluate_retrieval(trainer, cfg, encoder) -> dict[str, float]:
    """objective=clip|siglip: zero-shot retrieval R@1 both ways on the held-out pairs."""
    samples, model = encoded_eval_samples(trainer, cfg, encoder), trainer.engine.module
    images, texts = [], []
    with torch.no_grad(), _evaluating(model):
        for start in range(0, len(samples), cfg.train.micro_batch_size):
            batch = collate(samples[start : start + cfg.train.micro_batch_size], encoder.tokenizer.pad_token_id)
            out = model(**trainer.model_inputs(batch))
            images.append(out.image_embeds.float().cpu())
            texts.append(out.text_embeds.float().cpu())
    captions = [tuple(encoded.input_ids) for _, _, encoded in samples]
    return {"step": trainer.step, **retrieval_scores(torch.cat(images), torch.cat(texts), captions)}


def retrieval_scores(images_NE: torch.Tensor, texts_NE: torch.Tensor, captions: list) -> dict[str, float]:
    """R@1 image->text and text->image, a retrieved caption right when its text is the pair's."""
    same_NN = torch.tensor([[a == b for b in captions] for a in captions])
    similarity_NN = images_NE @ texts_NE.T
    rows = torch.arange(len(captions))
    image_to_text = same_NN[rows, similarity_NN.argmax(1)].float().mean()
    text_to_image = same_NN[similarity_NN.argmax(0), rows].float().mean()
    return {
        "eval_retrieval_i2t": float(image_to_text),
        "eval_retrieval_t2i": float(text_to_image),
        "eval_retrieval_chance": float(same_NN.float().mean()),
        "eval_samples": len(captions),
    }


class _evaluating:
    """model.eval() inside, the previous mode restored after."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *_: object) -> None:
        self.model.train(self.was_training)


def export_pretrained(trainer, cfg, tokenizer) -> Path | None:
    """Collective: write the trained part to <run.dir>/hf (rank 0); None where it is not written here
    (a tensor-parallel decoder, or LoRA: `vlm-convert` merges and joins those)."""
    model = trainer.engine.module
    if cfg.parallel.tensor_parallel > 1 or cfg.llm.lora.rank or cfg.vision.lora.rank:
        return None
    state = connector_state(model)  # the whole model's fp32 state, gathered under ZeRO-3
    out = Path(cfg.run.dir) / HF_FOLDER
    if trainer.layout.rank == 0:
        if isinstance(model, LanguageModel):
            _save_decoder(model, state, tokenizer, out)
        else:
            _save_dual_encoder(model, state, out)
        print(f"wrote the trained {'decoder' if isinstance(model, LanguageModel) else 'towers'} to {out}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return out


def _save_decoder(model: LanguageModel, state: dict[str, torch.Tensor], tokenizer, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf_model: Any = model.llm.hf_model
    fresh = AutoModelForCausalLM.from_config(hf_model.config)
    prefix = "llm.hf_model."
    fresh.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _save_dual_encoder(model: DualEncoder, state: dict[str, torch.Tensor], out: Path) -> None:
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    fresh = type(model.hf_model)(model.hf_model.config)
    fresh.load_state_dict(hf_state_dict(state, fresh.state_dict()), strict=True)
    fresh.save_pretrained(out)
    size, stats = model.image_size, dict(image_mean=list(model.image_mean), image_std=list(model.image_std))
    if model.family == "clip":
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **stats)
    else:
        processor = SiglipImageProcessor(size={"height": size, "width": size}, **stats)
    processor.save_pretrained(out)
