"""Which model names the server answers to, and where their MLX directories are."""

from __future__ import annotations

from pathlib import Path

from edgeai.errors import EdgeAIError, ModelNotFound


def _store():
    try:
        from edgeai import store
    except ImportError:  # the store is optional: `--model PATH` works without it
        return None
    return store


class ModelRegistry:
    """Served models: the ones given on the command line, then the local store's.

    A request names a model; it never names a path, so a client cannot make the server
    load an arbitrary directory.

    Args:
        served: name → MLX directory, given when the server started (the first is the default).
        use_store: also answer to models installed in the store.
    """

    def __init__(self, served: dict[str, Path], use_store: bool = True):
        self.served = {k: Path(v) for k, v in served.items()}
        self.use_store = use_store

    @property
    def default(self) -> str | None:
        return next(iter(self.served), None)

    def names(self) -> list[str]:
        names = list(self.served)
        store = _store() if self.use_store else None
        if store is not None:
            try:
                names += [
                    m.name
                    for m in store.list_models()
                    if m.name not in self.served and not m.problem
                ]
            except (EdgeAIError, OSError):
                pass
        return names

    def resolve(self, name: str) -> tuple[str, Path]:
        """(name, MLX directory) for a request's model name.

        Raises:
            ModelNotFound: not served and not installed.
        """
        if name in self.served:
            return name, self.served[name]
        store = _store() if self.use_store else None
        if store is None or "/" in name or name.startswith(".") or ":" in name:
            raise ModelNotFound(
                f"model '{name}' is not served here", f"use one of: {', '.join(self.names())}"
            )
        try:
            return name, Path(store.resolve(name))
        except ModelNotFound as e:
            raise ModelNotFound(e.message, e.hint or "see GET /v1/models") from None
