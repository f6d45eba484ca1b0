"""Request and sampling options, defined once with their defaults and bounds.

The CLI, the server and library callers all build these; nothing else holds defaults.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MAX_TOKENS = 512
MAX_SEED = 2**64 - 1  # MLX's PRNG key takes an unsigned 64-bit seed


class Message(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"] = Field(description="who wrote the message")
    content: str = Field(description="the message text")


class GenerationOptions(BaseModel):
    """Sampling and stopping options for one generation."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(
        DEFAULT_MAX_TOKENS, ge=1, le=131072, description="most tokens to generate"
    )
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (1 = off)")
    top_k: int = Field(0, ge=0, le=100000, description="keep the k most likely tokens (0 = off)")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="drop tokens below min_p × the top probability"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random seed for sampling")
    stop: list[str] = Field(
        default_factory=list, max_length=16, description="stop strings (not included in the output)"
    )
    top_logprobs: int = Field(0, ge=0, le=20, description="alternatives to report per token")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v
