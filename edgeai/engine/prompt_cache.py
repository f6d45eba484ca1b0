"""KV caches of recent prompts, reused when a new prompt starts with one of them.

An app sends the same long system prompt and a growing conversation; each turn's prompt
starts with the previous turn's. The KV cache of a finished prompt is kept (LRU, bounded by
bytes, per adapter), and the next prompt that shares its beginning prefills only the rest.

Only the positions a prompt fill computed are kept: never the generated ones, nor the
prompt's last (its step gives the first token and runs under the kernels' prompt context,
float32, while fills and decoding may use int8 activations), so a kept position is what
prefilling the same tokens later computes, and an answer with reuse equals the answer
without.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

DEFAULT_BYTES = 512 << 20  # $EDGEAI_PROMPT_CACHE_MB
MIN_REUSE = 16  # a shorter shared beginning is not worth keeping an entry busy for


@dataclass
class _Entry:
    scope: Hashable
    tokens: tuple[int, ...]
    cache: list
    nbytes: int


class PromptCache:
    """Recently used prompt KV caches of one model.

    An entry is taken out while a generation continues from it (its arrays are written in
    place) and put back, as that generation's prompt, when it ends.

    Args:
        max_bytes: the most bytes of KV kept; least recently used entries go first.
    """

    def __init__(self, max_bytes: int = DEFAULT_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def take(self, scope: Hashable, ids: Sequence[int]) -> tuple[list | None, int]:
        """The cache sharing the longest beginning with `ids`, cut to that beginning.

        Returns (cache, n): the first n ids are in the cache; at least one id is left to
        run, since the last prompt position gives the first token. (None, 0) on a miss.
        """
        with self._lock:
            best, best_n = None, 0
            for key, e in self._entries.items():
                if e.scope != scope:
                    continue
                n = _common_prefix(e.tokens, ids)
                if n > best_n:
                    best, best_n = key, n
            best_n = min(best_n, len(ids) - 1)
            if best is None or best_n < MIN_REUSE:
                self.misses += 1
                return None, 0
            entry = self._entries.pop(best)
        extra = len(entry.tokens) - best_n
        if extra and (
            not can_trim_prompt_cache(entry.cache) or trim_prompt_cache(entry.cache, extra) != extra
        ):
            with self._lock:
                self.misses += 1
            return None, 0
        with self._lock:
            self.hits += 1
            self.reused_tokens += best_n
        return entry.cache, best_n

    def put(self, scope: Hashable, ids: Sequence[int], cache: list, cached: int) -> None:
        """Keep `cache` as the prompt `ids` but its last id; it holds `cached` positions
        (prompt + generated).

        A cache holding fewer positions than the prompt (a generation stopped during its
        prefill), or one that cannot be cut back, is dropped.
        """
        if cached < len(ids) or len(ids) - 1 < MIN_REUSE:
            return
        ids = ids[:-1]  # the last position came from the first token's step: see the module
        extra = cached - len(ids)
        if not can_trim_prompt_cache(cache) or trim_prompt_cache(cache, extra) != extra:
            return
        tokens = tuple(ids)
        nbytes = _nbytes(cache)
        with self._lock:
            for key in [
                k for k, e in self._entries.items() if e.scope == scope and e.tokens == tokens
            ]:
                del self._entries[key]  # the same prompt again: keep the newest
            self._entries[self._next] = _Entry(scope, tokens, cache, nbytes)
            self._next += 1
            while self._entries and self.nbytes > self.max_bytes:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.nbytes,
                "hits": self.hits,
                "misses": self.misses,
                "reused_tokens": self.reused_tokens,
            }


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _nbytes(cache: list) -> int:
    """Bytes the cache's buffers hold (spare room for later positions included)."""
    return sum(
        a.nbytes
        for c in cache
        for a in (getattr(c, "keys", None), getattr(c, "values", None))
        if a is not None
    )
