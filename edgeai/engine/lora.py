"""Switchable LoRA: several adapters on one loaded base model, chosen per generation.

`LoRASwitch` wraps whatever linear module is in the model (nn.Linear, nn.QuantizedLinear or
a kernel-backed module from `edgeai.kernels`) and calls it unchanged; on top it adds
`scale * (x @ A) @ B` for the adapter that is active *now* — mlx-lm's LoRALinear, with the
scale and the add fused into one `addmm` (per-op cost dominates decoding on CPU).
The A/B matrices live outside
the module tree (in `LoadedAdapter`s held by an `AdapterSet`), so `model.parameters()` and
the base weights never change: switching adapters is a pointer change, loading one costs
only its own few MB.

Concurrency design: `Engine.generate` runs one generation per model at a time (it holds
`engine.lock`), and selects the adapter with `AdapterSet.use(name)` *inside* that lock, so
the selection is scoped to exactly that generation and no other request can observe it.
A caller that batches several requests in one forward pass (different rows, different
adapters) uses `AdapterSet.use_rows([name_or_None, ...])` instead: each batch row then gets
its own adapter's delta. `AdapterSet.routed(adapter_of)` does that for mlx-lm's
`BatchGenerator` (continuous batching, as the server runs it, see server/batching.py): it
stands in for the model and selects, at every forward pass, the adapter of each row's
request. `AdapterSet.fixed(name)` is the same for one adapter on every row.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import mlx.core as mx
import mlx.nn as nn

from edgeai.config import env_number
from edgeai.errors import InvalidInput
from edgeai.store import adapters
from edgeai.store.adapters import LoadedAdapter, check_targets

DEFAULT_CACHE = 8  # adapters kept in memory ($EDGEAI_ADAPTER_CACHE)


class LoRASwitch(nn.Module):
    """A linear module plus the active adapter's low-rank delta (none active: the base alone).

    Args:
        base: the module to wrap; it is called as is, so builtin and custom kernels both work.
        path: this module's path in the model, the key into each adapter's pairs.
        owner: the AdapterSet that says which adapter is active.
    """

    def __init__(self, base: nn.Module, path: str, owner: AdapterSet):
        super().__init__()
        self.base = base
        # Plain attributes (not arrays/dicts) stay out of the parameter tree.
        self._path = path
        self._owner = owner

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        sel = self._owner.selection
        if sel is None:
            return y
        if isinstance(sel, LoadedAdapter):
            return self._add_delta(y, sel, x)
        # Rows with different adapters: each group's delta over the batch, kept on its rows
        # only (a few ops per adapter in the batch, not per row).
        out = y
        for ad, rows in sel:
            if rows.ndim != y.ndim:
                rows = rows.reshape(-1, *([1] * (y.ndim - 1)))
            out = mx.where(rows, self._add_delta(out, ad, x), out)
        return out

    def _add_delta(self, y: mx.array, ad: LoadedAdapter, x: mx.array) -> mx.array:
        """y + the adapter's delta; one fused op when dtypes agree (decode pays per op on CPU)."""
        pair = ad.pairs.get(self._path)
        if pair is None:
            return y
        a, b = pair
        if x.dtype == y.dtype == a.dtype == b.dtype:
            return mx.addmm(y, x @ a, b, alpha=ad.scale)
        # mlx-lm's LoRALinear association and casts.
        return y + (ad.scale * ((x @ a) @ b)).astype(x.dtype)


Loader = Callable[[str], LoadedAdapter]


class AdapterSet:
    """The adapters of one loaded model: an LRU of loaded adapters and the current selection.

    Args:
        model: the loaded model; its target layers are wrapped on first use.
        loader: name -> LoadedAdapter (the store's loader checks the base model).
        capacity: adapters kept in memory (default $EDGEAI_ADAPTER_CACHE or 8).
        version_of: name -> the stored adapter's current version; when given, a cached
            adapter that was replaced or removed in the store is reloaded or refused (checked
            at most once a second per adapter).
    """

    RECHECK_S = 1.0

    def __init__(
        self,
        model: nn.Module,
        loader: Loader,
        capacity: int | None = None,
        version_of: Callable[[str], object] | None = None,
    ):
        self.model = model
        self.loader = loader
        self.version_of = version_of
        self._checked: dict[str, float] = {}
        self._wrapped: dict[str, LoRASwitch] = {}  # module path -> its wrapper in the model
        cache = capacity or env_number(
            "EDGEAI_ADAPTER_CACHE", DEFAULT_CACHE, low=1, high=4096, kind=int
        )
        self.capacity = max(1, cache)
        # What LoRASwitch reads: one adapter for the whole batch, or (adapter, row mask) groups.
        self.selection: LoadedAdapter | list[tuple[LoadedAdapter, mx.array]] | None = None
        self._cache: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._lock = threading.RLock()
        self.loads = 0  # how many times an adapter was read from disk (for tests and bench)

    @property
    def cached(self) -> list[str]:
        """Names of the adapters in memory, least recently used first."""
        return list(self._cache)

    def get(self, name: str) -> LoadedAdapter:
        """The adapter `name`, from memory or loaded (and its layers wrapped); marks it used."""
        with self._lock:
            ad = self._cache.get(name)
            if ad is not None and self._current(ad):
                self._cache.move_to_end(name)
                return ad
            ad = self.loader(name)
            self._install(ad)
            self.loads += 1
            self._cache[name] = ad
            self._evict()
            return ad

    def _current(self, ad: LoadedAdapter) -> bool:
        """False when the store holds another version of `ad` now (raises if it is gone)."""
        if self.version_of is None:
            return True
        now = time.monotonic()
        if now - self._checked.get(ad.name, -1e9) < self.RECHECK_S:
            return True
        if self.version_of(ad.name) != ad.version:
            return False
        self._checked[ad.name] = now
        return True

    def drop(self, name: str) -> None:
        """Forget a cached adapter (e.g. after it was removed from the store)."""
        with self._lock:
            if not self._pins.get(name):
                self._cache.pop(name, None)

    @contextmanager
    def use(self, name: str | None) -> Iterator[LoadedAdapter | None]:
        """Make `name` the active adapter for the body (None: the base model alone).

        Hold the model's generation lock around it: the selection is model-wide.
        """
        if name is None:
            yield None
            return
        with self._selected([name]) as ads:
            self.selection = ads[0]
            try:
                yield ads[0]
            finally:
                self.selection = None

    @contextmanager
    def use_rows(
        self, names: Sequence[str | LoadedAdapter | None]
    ) -> Iterator[list[LoadedAdapter | None]]:
        """One adapter (a name, one `get` returned, or None) per row of the batch in the body."""
        with self._selected(names) as ads:
            self.selection = _row_groups(ads)
            try:
                yield ads
            finally:
                self.selection = None

    @contextmanager
    def _selected(
        self, items: Sequence[str | LoadedAdapter | None]
    ) -> Iterator[list[LoadedAdapter | None]]:
        """Load and pin the named adapters so the LRU keeps them while they are in use.

        A LoadedAdapter is taken as is: a request that resolved its adapter when it started
        keeps that version even if the store replaces it meanwhile.
        """
        names = [i for i in items if isinstance(i, str)]
        with self._lock:
            pinned = []
            try:
                for n in names:
                    self._pins[n] = self._pins.get(n, 0) + 1
                    pinned.append(n)
                    self.get(n)
                ads = [self._cache[i] if isinstance(i, str) else i for i in items]
            except BaseException:
                self._unpin(pinned)
                raise
        try:
            yield ads
        finally:
            with self._lock:
                self._unpin(names)
                self._evict()

    def routed(
        self,
        rows: Callable[[int], Sequence[str | LoadedAdapter | None]],
        context: Callable[[], AbstractContextManager] | None = None,
    ) -> RoutedModel:
        """The model with a per-row adapter on every forward pass.

        Args:
            rows: the batch size of a call -> each row's adapter: best the LoadedAdapter
                that `get(name)` gave when the request was admitted (no store lookups per
                step; the request keeps that version), or a name, or None.
            context: entered around every forward pass (the graph is built inside it), e.g.
                the kernels' float32 context for prompts (`Hooks.prompt_context`).
        """
        return RoutedModel(self, rows, context)

    def fixed(
        self,
        adapter: str | LoadedAdapter | None,
        context: Callable[[], AbstractContextManager] | None = None,
    ) -> nn.Module | RoutedModel:
        """The model with one adapter (or none) on every row of every call."""
        if adapter is None and context is None:
            return self.model
        return RoutedModel(self, lambda n: [adapter] * n, context)

    def _unpin(self, names: Sequence[str]) -> None:
        for n in names:
            if self._pins.get(n):
                self._pins[n] -= 1
                if not self._pins[n]:
                    del self._pins[n]

    def _evict(self) -> None:
        for name in list(self._cache):
            if len(self._cache) <= self.capacity:
                break
            if not self._pins.get(name):
                del self._cache[name]

    def _install(self, ad: LoadedAdapter) -> None:
        """Check `ad` against the model and wrap the layers it targets (once per layer)."""
        # Adapters mostly target the same layers: once those are wrapped, skip walking the model.
        modules = (
            self._wrapped
            if all(p in self._wrapped for p in ad.pairs)
            else dict(self.model.named_modules())
        )
        problems = check_targets(modules, ad.pairs)
        if problems:
            raise InvalidInput(
                f"adapter {ad.name!r} does not fit this model: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                "use the base model the adapter was trained on",
            )
        wraps = []
        for path in ad.pairs:
            m = modules[path]
            if not isinstance(m, LoRASwitch):
                m = LoRASwitch(m, path, self)
                wraps.append((path, m))
            self._wrapped[path] = m
        if wraps:
            from mlx.utils import tree_unflatten

            self.model.update_modules(tree_unflatten(wraps))
        mx.eval([p for pair in ad.pairs.values() for p in pair])


def _row_groups(ads: list[LoadedAdapter | None]):
    """The selection for per-row adapters: None, one adapter, or (adapter, row mask) groups."""
    distinct = {id(a): a for a in ads if a is not None}
    if not distinct:
        return None
    if len(distinct) == 1 and all(a is not None for a in ads):
        return next(iter(distinct.values()))
    return [(a, mx.array([b is a for b in ads]).reshape(-1, 1, 1)) for a in distinct.values()]


class RoutedModel:
    """Calls the model with each batch row's adapter selected; everything else is the model's.

    `rows(batch_size)` says which adapter each row of a call gets; a call whose rows cannot
    be told (a wrong count) is refused rather than run with the wrong adapter.
    """

    def __init__(
        self,
        owner: AdapterSet,
        rows: Callable[[int], Sequence[str | LoadedAdapter | None]],
        context: Callable[[], AbstractContextManager] | None = None,
    ):
        self._owner = owner
        self._rows = rows
        self._context = context or nullcontext

    def __getattr__(self, name: str):
        return getattr(self._owner.model, name)

    def __call__(self, inputs: mx.array, *args, **kwargs) -> mx.array:
        names = list(self._rows(inputs.shape[0]))
        if len(names) != inputs.shape[0]:
            raise RuntimeError(f"{len(names)} adapters for a batch of {inputs.shape[0]} rows")
        # The graph is built inside the call, so the selection only needs to last that long.
        rows = nullcontext() if all(n is None for n in names) else self._owner.use_rows(names)
        with self._context(), rows:
            return self._owner.model(inputs, *args, **kwargs)


def store_set(model: nn.Module, base: str, path=None, capacity: int | None = None) -> AdapterSet:
    """An AdapterSet that loads adapters from the store, refusing those added for another base.

    Args:
        model: the loaded base model.
        base: its name; an adapter added for another name (and another directory) is refused.
        path: its directory.
        capacity: adapters kept in memory.
    """

    def load(name: str) -> LoadedAdapter:
        return adapters.load(name, base=base, base_path=path)

    return AdapterSet(model, load, capacity, version_of=adapters.version)
