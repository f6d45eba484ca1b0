"""Running a local model: `Engine` (load, encode, generate), the one decode loop, LoRA."""

from edgeai.engine.engine import Engine, Prompt

__all__ = ["Engine", "Prompt"]
