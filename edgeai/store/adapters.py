"""The adapter store: mlx-lm LoRA adapters checked against their base model, kept by name.

Layout: `config.home()/adapters/<name>/` holds the adapter's own `adapter_config.json` and
`adapters.safetensors` (unchanged, so mlx-lm can still read them) plus `edgeai.json`
(the base model it was checked against, rank, scale, size). Adding is atomic: the files
are written to a temporary directory beside the store and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgeai import config
from edgeai.errors import InvalidInput, ModelNotFound

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
META_FILE = "edgeai.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_SCALE = 1000.0  # mlx-lm's default is 20; far beyond this, float16 activations overflow


class _LoraParameters(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    scale: float = Field(ge=-MAX_SCALE, le=MAX_SCALE, allow_inf_nan=False)
    rank: int | None = Field(None, ge=1)


class AdapterConfig(BaseModel):
    """adapter_config.json as `mlx_lm.lora` writes it: the keys edgeai reads are checked, the
    rest kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    fine_tune_type: str = "lora"
    lora_parameters: _LoraParameters


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as infinity
        raise ValueError(f"{text[:40]} is not a finite number")
    return value


@dataclass
class AdapterInfo:
    """One stored adapter, as `edgeai adapter list` shows it."""

    name: str
    base: str  # the base model's name: the adapter only runs on this model
    rank: int
    scale: float
    layers: int  # how many linear layers it changes
    size_bytes: int
    added: float  # unix time
    base_path: str = ""  # the base model's directory when it was added
    path: str = ""
    problem: str | None = None  # set when its edgeai.json is unreadable (listed as damaged)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedAdapter:
    """One adapter's weights in memory.

    Attributes:
        name: the adapter's store name.
        scale: the LoRA scale (mlx-lm's `lora_parameters.scale`).
        pairs: module path (e.g. "model.layers.3.self_attn.q_proj") -> (A [in, r], B [r, out]).
    """

    name: str
    scale: float
    pairs: dict[str, tuple[mx.array, mx.array]] = field(default_factory=dict)
    version: object = None  # what the store said identifies these files (replaced: reload)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.pairs.values())


def pairs_from_weights(
    weights: dict[str, mx.array],
) -> tuple[dict[str, tuple[mx.array, mx.array]], list[str]]:
    """Group mlx-lm adapter tensors ("<path>.lora_a", "<path>.lora_b") by module path.

    Returns:
        (pairs, problems): problems lists tensors that are not LoRA pairs or whose A and B
        ranks disagree; empty when the file is well formed.
    """
    pairs: dict[str, dict[str, mx.array]] = {}
    problems = []
    for key, w in weights.items():
        path, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b") or not path:
            problems.append(
                f"{key}: not a LoRA tensor (DoRA and full fine-tunes are not supported)"
            )
            continue
        pairs.setdefault(path, {})[leaf] = w
    out = {}
    for path, p in sorted(pairs.items()):
        if set(p) != {"lora_a", "lora_b"}:
            problems.append(f"{path}: has only {', '.join(sorted(p))}")
        elif (
            p["lora_a"].ndim != 2
            or p["lora_b"].ndim != 2
            or p["lora_a"].shape[1] != p["lora_b"].shape[0]
        ):
            problems.append(
                f"{path}: lora_a {tuple(p['lora_a'].shape)} "
                f"and lora_b {tuple(p['lora_b'].shape)} do not chain"
            )
        else:
            out[path] = (p["lora_a"], p["lora_b"])
    return out, problems


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(input_dims, output_dims) of a linear-like module, or None if it is not one."""
    if isinstance(getattr(module, "base", None), nn.Module):  # a LoRA switch around the layer
        module = module.base
    if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
        return None
    if isinstance(getattr(module, "input_dims", None), int) and isinstance(
        getattr(module, "output_dims", None), int
    ):
        return module.input_dims, module.output_dims
    w = module.get("weight") if isinstance(module, nn.Module) else None
    if not isinstance(w, mx.array) or w.ndim != 2:
        return None
    if "scales" in module:  # quantized: the packed uint32 row holds 32 // bits values per word
        bits = getattr(module, "bits", None)
        if not isinstance(bits, int):
            return None
        return w.shape[1] * 32 // bits, w.shape[0]
    return w.shape[1], w.shape[0]


def check_targets(
    modules: dict[str, nn.Module], pairs: dict[str, tuple[mx.array, mx.array]]
) -> list[str]:
    """Problems that keep `pairs` from applying to a model (names, module kinds, shapes).

    Args:
        modules: the model's `dict(model.named_modules())` (or the part of it `pairs` names).
        pairs: module path -> (A, B), as `pairs_from_weights` gives.
    """
    problems = []
    for path, (a, b) in pairs.items():
        m = modules.get(path)
        if m is None:
            problems.append(f"{path}: no such layer in the base model")
            continue
        dims = linear_dims(m)
        if dims is None:
            problems.append(f"{path}: is a {type(m).__name__}, not a linear layer")
        elif (a.shape[0], b.shape[1]) != dims:
            problems.append(
                f"{path}: adapter maps {a.shape[0]} -> {b.shape[1]}, "
                f"the base layer {dims[0]} -> {dims[1]}"
            )
    return problems


def adapters_dir() -> Path:
    return config.home() / "adapters"


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(
            f"{name!r} is not a valid adapter name",
            "use letters, digits, '.', '_' or '-' (at most 64, starting with a letter or digit)",
        )
    return name


def resolve_base(model: str) -> tuple[str, Path]:
    """(name, directory) of a base model given as a store name or an MLX model directory."""
    p = Path(model).expanduser()
    if (p / "config.json").is_file():
        return p.resolve().name, p
    from edgeai import store

    path = store.resolve(model)  # raises ModelNotFound with close names
    # Aliases resolve to the installed model; record its store name.
    for lm in store.list_models():
        if Path(lm.path).resolve() == Path(path).resolve():
            return lm.name, Path(path)
    return model, Path(path)


def read_adapter(src: Path):
    """Read and check an mlx-lm adapter directory on its own (no base model needed).

    Returns:
        (adapter_config dict, scale, pairs) where pairs maps module path -> (A, B).
    """
    src = Path(src)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (src / f).is_file()]
    if missing:
        raise InvalidInput(
            f"{src} is not an mlx-lm adapter directory (missing {', '.join(missing)})",
            "train one with `mlx_lm.lora --train --adapter-path DIR` and pass DIR",
        )
    try:  # NaN and Infinity are refused anywhere in the file, not only where edgeai looks
        raw = json.loads(
            (src / CONFIG_FILE).read_bytes().decode("utf-8"),
            parse_constant=_no_constant,
            parse_float=_finite,
        )
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidInput(
            f"{src / CONFIG_FILE} is not valid JSON: {e}", "re-save the adapter"
        ) from None
    try:
        cfg = AdapterConfig.model_validate(raw)
    except ValidationError as e:
        key, first = config.first_problem(e)
        raise InvalidInput(
            f"{src / CONFIG_FILE}: {key}: {first['msg']}", "re-save the adapter with mlx-lm"
        ) from None
    if cfg.fine_tune_type != "lora":
        raise InvalidInput(
            f"{src} is a {cfg.fine_tune_type!r} fine-tune; only LoRA adapters can be hot-swapped",
            "train with --fine-tune-type lora",
        )
    try:
        weights = mx.load(str(src / WEIGHTS_FILE))
    except (RuntimeError, ValueError, OSError) as e:
        raise InvalidInput(
            f"{src / WEIGHTS_FILE} is not a readable safetensors file: {e}", "re-save the adapter"
        ) from e
    pairs, problems = pairs_from_weights(weights)
    if problems or not pairs:
        raise InvalidInput(
            f"{src / WEIGHTS_FILE} is not a LoRA adapter: "
            f"{problems[0] if problems else 'no tensors'}",
            "give the directory mlx_lm.lora wrote",
        )
    bad = next((k for k, w in sorted(weights.items()) if not mx.isfinite(w).all().item()), None)
    if bad is not None:
        raise InvalidInput(
            f"{src / WEIGHTS_FILE}: tensor {bad} holds values that are not finite "
            "(NaN or infinity)",
            "the training diverged; train again (e.g. with a lower learning rate)",
        )
    return raw, cfg.lora_parameters.scale, pairs


def check_fit(pairs: dict, base_dir: Path, base_name: str) -> None:
    """Refuse `pairs` unless every target is a linear layer of the base with the same shape."""
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(base_dir), lazy=True)  # structure and shapes; weights stay on disk
    problems = check_targets(dict(model.named_modules()), pairs)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidInput(
            f"the adapter does not fit base model {base_name!r}: {problems[0]}{more}",
            "pass the --base model the adapter was trained on",
        )


def add(src: str | Path, base: str, name: str | None = None, force: bool = False) -> AdapterInfo:
    """Check an mlx-lm adapter directory against `base` and store it as `name`.

    Args:
        src: the adapter directory (adapter_config.json + adapters.safetensors).
        base: the base model, a store name or an MLX model directory.
        name: the adapter's name (defaults to the directory name).
        force: replace an adapter of the same name.
    """
    src = Path(src).expanduser()
    name = _check_name(name or src.resolve().name)
    base_name, base_dir = resolve_base(base)
    _cfg, scale, pairs = read_adapter(src)
    check_fit(pairs, base_dir, base_name)
    dest = adapters_dir() / name
    if dest.exists() and not force:
        raise InvalidInput(
            f"an adapter named {name!r} exists already", "pass --force to replace it, or --name"
        )
    adapters_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".add-{name}-", dir=adapters_dir()))
    try:
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(src / f, tmp / f)
        info = AdapterInfo(
            name=name,
            base=base_name,
            rank=int(next(iter(pairs.values()))[0].shape[1]),
            scale=scale,
            layers=len(pairs),
            size_bytes=(tmp / WEIGHTS_FILE).stat().st_size,
            added=time.time(),
            base_path=str(Path(base_dir).resolve()),
        )
        meta = info.to_dict()
        meta.pop("path")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if dest.exists():  # --force: move the old one aside first so the swap is one rename
            old = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=adapters_dir()))
            os.rename(dest, old / name)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info.path = str(dest)
    return info


_META = TypeAdapter(AdapterInfo)


def _read_info(name: str) -> AdapterInfo:
    """The stored adapter `name`; one whose edgeai.json is broken comes with a `problem`."""
    d = adapters_dir() / _check_name(name)
    try:
        meta = json.loads((d / META_FILE).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ModelNotFound(
            f"no adapter named {name!r}",
            "see `edgeai adapter list`; add one with `edgeai adapter add`",
        ) from None
    except (OSError, ValueError):
        meta = None
    try:
        return _META.validate_python({**meta, "name": name, "path": str(d), "problem": None})
    except (TypeError, ValidationError):  # not an object, or fields of the wrong type
        return AdapterInfo(
            name=name,
            base="?",
            rank=0,
            scale=0.0,
            layers=0,
            size_bytes=0,
            added=0.0,
            path=str(d),
            problem=f"its {META_FILE} is broken",
        )


def get(name: str) -> AdapterInfo:
    """The stored adapter `name`.

    Raises:
        ModelNotFound: there is none; InvalidInput: it is damaged.
    """
    info = _read_info(name)
    if info.problem:
        raise InvalidInput(
            f"adapter {name!r} is damaged: {info.problem}",
            f"remove it with `edgeai adapter rm {name}` and add it again",
        )
    return info


def list_adapters() -> list[AdapterInfo]:
    """Every stored adapter, by name (damaged ones with their `problem`)."""
    d = adapters_dir()
    if not d.is_dir():
        return []
    return [
        _read_info(p.name)
        for p in sorted(d.iterdir())
        if (p / META_FILE).is_file() and _NAME.match(p.name)
    ]


def remove(name: str) -> AdapterInfo:
    """Delete the stored adapter `name` (renamed aside first, so readers never see half of it)."""
    info = _read_info(name)
    trash = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=adapters_dir()))
    os.rename(info.path, trash / name)
    shutil.rmtree(trash, ignore_errors=True)
    return info


def version(name: str) -> tuple[int, int]:
    """Identifies the stored files of `name` (changes when it is replaced; raises if removed)."""
    try:
        st = (adapters_dir() / _check_name(name) / META_FILE).stat()
    except FileNotFoundError:
        raise ModelNotFound(f"no adapter named {name!r}", "see `edgeai adapter list`") from None
    return st.st_ino, st.st_mtime_ns


def load(name: str, base: str | None = None, base_path: str | Path | None = None):
    """Read a stored adapter into memory for `edgeai.engine.lora.AdapterSet`.

    Args:
        name: the adapter's name.
        base: the name of the model it will run on; refused unless that name or `base_path`
            is the base model the adapter was added for.
        base_path: that model's directory.
    """
    ver = version(name)
    info = get(name)
    same_dir = (
        base_path is not None
        and info.base_path
        and Path(base_path).resolve() == Path(info.base_path)
    )
    if base is not None and info.base != base and not same_dir:
        raise InvalidInput(
            f"adapter {name!r} was added for base model {info.base!r}, not {base!r}",
            f"run it on {info.base!r}, "
            f"or re-add it with --base {base} if it was trained on that model",
        )
    _cfg, scale, pairs = read_adapter(Path(info.path))
    return LoadedAdapter(name=name, scale=scale, pairs=pairs, version=ver)
