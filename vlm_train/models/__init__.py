"""Plain single-device PyTorch models. Nothing here imports deepspeed, hydra or megatron's
parallel state (tests/test_boundaries.py enforces it); parallelism is applied from `parallel/`."""

from vlm_train.models.connectors import Connector, Placement, build_connector
from vlm_train.models.decoder import Decoder
from vlm_train.models.llm import CausalLM, build_llm
from vlm_train.models.vision import VisionTower, build_vision_tower
from vlm_train.models.vlm import VisionLanguageModel, VLMOutput

__all__ = [
    "CausalLM",
    "Connector",
    "Decoder",
    "Placement",
    "VLMOutput",
    "VisionLanguageModel",
    "VisionTower",
    "build_connector",
    "build_llm",
    "build_vision_tower",
]
