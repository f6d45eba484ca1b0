"""Hidden states of an answer, taken from the decode steps that produce it.

A confidence probe (edgeai.routing.confidence) reads the residual stream of chosen decoder
layers at two positions: the last prompt token (the step that yields the first answer
token: what the model "thinks" before answering) and the step that yields the answer's last
token. `HiddenTap` records those layers' last-position outputs at every model call, inside
the step's own graph, so the probe costs no extra forward pass: a slice per tapped layer.

The tap works by giving each tapped layer a subclass of its current class (the way edgeai's
kernels install theirs), so the parameters and the module tree stay as they are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers, in order (mlx-lm's `model.model.layers` or `model.layers`)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(model, "layers", None)
    if not layers:
        raise ValueError("cannot find the model's decoder layers")
    return list(layers)


def layer_index(spec: float | int, n_layers: int) -> int:
    """A layer by index (int; negative counts from the end) or by depth fraction (0 < f ≤ 1)."""
    if isinstance(spec, float):
        return max(0, min(n_layers - 1, round(spec * n_layers) - 1))
    return spec % n_layers


class HiddenTap:
    """Records the last position of chosen layers' outputs at every model call.

    Args:
        model: the mlx-lm model.
        layers: layer indices (negative from the end).

    `read()` is the current call's (rows, len(layers) * hidden) array, lazy: the decode loop
    evaluates it with the step's token. One tap serves every sequence on the model; each
    sequence keeps its own values in a `Capture`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int]):
        mods = decoder_layers(model)
        self.layers = sorted({i % len(mods) for i in layers})
        self._out: dict[int, mx.array] = {}
        for i in self.layers:
            _install(mods[i], self, i)

    def record(self, index: int, out: mx.array) -> None:
        self._out[index] = out

    def read(self) -> mx.array:
        """The tapped layers' outputs at the last position of the latest call, concatenated."""
        parts = [self._out[i][:, -1, :] for i in self.layers]
        return (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)).astype(mx.float32)


@dataclass
class States:
    """An answer's hidden states: `values[p, j]` is layer `layers[j]` at position p
    (0: the prompt's end, 1: the answer's end)."""

    layers: list[int]
    values: np.ndarray  # (2, len(layers), hidden), float32

    def select(self, layers: Sequence[int]) -> np.ndarray:
        """The states of `layers` (all of them tapped) as one vector: prompt end, answer end."""
        idx = [self.layers.index(i) for i in layers]
        return self.values[:, idx, :].reshape(-1)


class Capture:
    """One sequence's hidden states: at its first token's step and at its latest token's."""

    def __init__(self, tap: HiddenTap):
        self.tap = tap
        self.first: mx.array | None = None
        self.last: mx.array | None = None

    def keep(self, step: int, value: mx.array) -> None:
        if step == 0:
            self.first = value
        self.last = value

    def states(self, row: int = 0) -> States | None:
        """One row's `States`, or None before any step."""
        if self.first is None or self.last is None:
            return None
        return _states(self.tap, [(self.first, row), (self.last, row)])


def _install(layer: nn.Module, tap: HiddenTap, index: int) -> None:
    cls = type(layer)
    if getattr(cls, "_edgeai_tapped", False):  # a tap again on the same layer: re-point it
        layer.__dict__["_tap"] = (tap, index)
        return

    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        t = self.__dict__.get("_tap")
        if t is not None:
            t[0].record(t[1], out)
        return out

    layer.__class__ = type(
        f"Tapped{cls.__name__}", (cls,), {"__call__": __call__, "_edgeai_tapped": True}
    )
    layer.__dict__["_tap"] = (tap, index)


class RowStates:
    """Hidden states of batch rows (by request uid) for a batched decoder (the server's).

    Every decoding call of a batch yields one token per row, handed out later in call
    order (a batch may build the next step before returning this one's tokens): `record`
    queues each row's state per call, `token` takes the oldest for the token handed out,
    and the row's first and latest are kept, as `Capture` keeps them for one stream.
    """

    def __init__(self, tap_of: Callable[[], HiddenTap | None]):
        self._tap_of = tap_of
        self._queued: dict[int, deque[tuple[mx.array, int]]] = {}
        self._kept: dict[int, list[tuple[mx.array, int]]] = {}

    @property
    def active(self) -> bool:
        """Whether the model is tapped (otherwise there is nothing to record)."""
        return self._tap_of() is not None

    def record(self, uids: Sequence[int]) -> None:
        """After a decoding call whose rows are `uids`: queue each row's tapped state."""
        tap = self._tap_of()
        if tap is None:
            return
        value = tap.read()
        for row, uid in enumerate(uids):
            self._queued.setdefault(uid, deque()).append((value, row))

    def token(self, uid: int) -> None:
        """A token of `uid` was handed out: its state is the oldest queued one."""
        queued = self._queued.get(uid)
        if not queued:
            return
        got = queued.popleft()
        kept = self._kept.setdefault(uid, [got, got])
        kept[1] = got

    def states(self, uid: int) -> States | None:
        """`uid`'s States (first and latest token); forgets the row."""
        kept = self._kept.pop(uid, None)
        self._queued.pop(uid, None)
        tap = self._tap_of()
        if kept is None or tap is None:
            return None
        return _states(tap, kept)

    def drop(self, uid: int) -> None:
        self._queued.pop(uid, None)
        self._kept.pop(uid, None)


def _states(tap: HiddenTap, at: Sequence[tuple[mx.array, int]]) -> States:
    """States from (value of a step, row) at the prompt's end and at the answer's end."""
    both = np.stack([np.asarray(v[row], dtype=np.float32) for v, row in at])
    return States(list(tap.layers), both.reshape(2, len(tap.layers), -1))
