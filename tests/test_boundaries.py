"""Models are plain PyTorch: importing them pulls in no deepspeed, hydra or megatron parallel state."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "vlm_train" / "models"
FORBIDDEN = ("deepspeed", "hydra", "megatron.core.parallel_state", "megatron.core.tensor_parallel")


def test_models_source_imports_nothing_forbidden():
    for file in MODELS.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{file.name} imports {name}"


def test_importing_and_building_models_loads_no_forbidden_module():
    code = (
        "import sys\n"
        "from vlm_train.config import Config, MLPConnectorConfig\n"
        "from vlm_train.models import build_vision_tower, build_llm, build_connector\n"
        "cfg = Config(connector=MLPConnectorConfig(path=None))\n"
        "cfg.vision.path = cfg.llm.path = None\n"
        "tower = build_vision_tower(cfg.vision)\n"
        "llm = build_llm(cfg.llm, vocab_size=64)\n"
        "build_connector(cfg.connector, vision_dim=tower.hidden_size, llm_dim=llm.hidden_size, num_patches=9)\n"
        f"bad = [m for m in sys.modules if m.startswith({FORBIDDEN!r})]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
