"""Grammar-constrained decoding: JSON objects, JSON schemas and tool calls, through llguidance.

A `Constraint` is a checked llguidance grammar (made from a request's `response_format`, a
`--json-schema` file or a forced tool call) that needs no model. `Constraint.processor`
turns it into an mlx-lm logits processor for one sequence of one model: each call feeds the
grammar the tokens sampled since the last call (read from the token context both decoding
loops pass in) and masks every token the grammar does not allow next. When the grammar is
complete only end-of-sequence is allowed, so the answer ends there.

Why llguidance (1.9): one abi3 wheel per platform (Linux x86_64/aarch64, macOS 11+ arm64)
that depends on nothing; it computes masks lazily per step (≈0.3 ms/token on a 49k
vocabulary, benchmarks/bench_structured.py) and takes context-free grammars, so recursive
schemas and the tool-call wrapper (Lark with an embedded `%json` schema) are one grammar.
xgrammar 0.2 requires torch (and triton on Linux); outlines-core 0.2 has no dependencies
either, but builds a regex automaton over the whole vocabulary per schema (recursion only to a
fixed depth, no wrapper grammar), and its current macOS wheels need macOS 14.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np

from edgeai.errors import InvalidInput
from edgeai.types import Event

log = logging.getLogger("edgeai.constrain")
# Compact, bounded separators: flexible whitespace lets a small model pad an answer with
# newlines until max_tokens, which leaves the JSON unfinished.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# What a disallowed token's logit becomes: finite, so entropies and reported logprobs stay
# numbers (-inf gives NaN entropies and JSON that cannot be written), yet never sampled.
MASKED = -1e9
MAX_DIGIT_RUN = 16  # digit-only tokens in a row before digits are masked where possible
_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_digits: weakref.WeakKeyDictionary[Any, np.ndarray] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Constraint:
    """A checked llguidance grammar and what it was made from ("json_object", "json_schema",
    "tool_call"), for messages."""

    grammar: str
    kind: str
    lark: str = ""  # the Lark source, when `specials` may be rewritten per tokenizer
    specials: tuple[str, ...] = ()  # literals that a model may emit as one special token

    def for_tokenizer(self, tokenizer: Any) -> str:
        """The grammar for this tokenizer: a literal such as "<tool_call>" that the vocabulary
        holds as one added token must be matched as that token (llguidance reads special
        tokens as their ids, never as text), so `"<tool_call>"` becomes `<[151657]>`."""
        get = getattr(tokenizer, "get_added_vocab", None)
        added = get() if callable(get) else {}
        src = self.lark
        for text in self.specials:
            if text in added:
                src = src.replace(json.dumps(text), f"<[{int(added[text])}]>")
        if src == self.lark:
            return self.grammar
        return llguidance.LLMatcher.grammar_from_lark(src)

    def processor(self, tokenizer: Any, vocab_size: int) -> GrammarProcessor:
        """A logits processor for one sequence of the model with this tokenizer.

        Args:
            tokenizer: mlx-lm's TokenizerWrapper (or a Hugging Face fast tokenizer).
            vocab_size: the width of the model's logits (can exceed the tokenizer's).
        """
        eos = [
            int(t) for t in getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]
        ]
        matcher = llguidance.LLMatcher(
            ll_tokenizer(tokenizer, vocab_size), self.for_tokenizer(tokenizer), log_level=0
        )
        matcher.compute_bitmask()  # a grammar with no first token fails here, not mid-answer
        if matcher.is_error():  # what only the model's tokens can reveal (e.g. a token limit)
            why = matcher.get_error().strip().splitlines()[0]
            raise InvalidInput(
                f"the {self.kind.replace('_', ' ')} grammar admits no answer ({why})",
                "check the schema: can any JSON value satisfy it?",
            )
        return GrammarProcessor(matcher, eos, _digit_tokens(tokenizer, vocab_size))


def _rust_errors(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call into llguidance; a Rust panic (pyo3: a BaseException) becomes a ValueError."""
    try:
        return fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - includes pyo3's PanicException
        if isinstance(e, ValueError):
            raise
        raise ValueError(str(e) or type(e).__name__) from None


def _check(grammar: str, kind: str, what: str) -> Constraint:
    try:
        err, msgs = _rust_errors(llguidance.LLMatcher.validate_grammar_with_warnings, grammar)
    except ValueError as e:
        err, msgs = True, [str(e)]
    if err:
        raise InvalidInput(
            f"{what} is not supported: {' '.join(msgs).strip()}",
            "use JSON Schema's types, properties, items, enum, const, anyOf, $ref and "
            "string/number bounds",
        )
    return Constraint(grammar, kind)


def json_schema(schema: Any, what: str = "the JSON schema") -> Constraint:
    """A constraint for answers that validate against `schema` (a dict or True).

    Raises:
        InvalidInput: the schema is not an object, or uses features llguidance cannot
            enforce (named in the message).
    """
    if schema is True or schema == {}:
        schema = {}
    elif not isinstance(schema, dict):
        raise InvalidInput(
            f"{what} must be a JSON object, not {type(schema).__name__}",
            'give a schema such as {"type": "object", "properties": {...}}',
        )
    try:
        grammar = _rust_errors(
            llguidance.LLMatcher.grammar_from_json_schema, schema, overrides=JSON_STYLE
        )
    except ValueError as e:
        raise InvalidInput(
            f"{what} is not valid: {e}", "check it with a JSON Schema validator"
        ) from None
    return _check(grammar, "json_schema", what)


def json_object() -> Constraint:
    """A constraint for answers that are one JSON object (any keys)."""
    return json_schema({"type": "object"}, "json_object")


def lark(grammar: str, kind: str, what: str, specials: tuple[str, ...] = ()) -> Constraint:
    """A constraint from a Lark grammar (which may embed JSON schemas with `%json {...}`);
    `specials`: its literals that a tokenizer may hold as one special token each."""
    try:
        text = _rust_errors(llguidance.LLMatcher.grammar_from_lark, grammar)
    except ValueError as e:
        raise InvalidInput(
            f"{what} is not valid: {e}", "check it with a JSON Schema validator"
        ) from None
    checked = _check(text, kind, what)
    return Constraint(checked.grammar, kind, grammar, specials) if specials else checked


def ll_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of a model's tokenizer (built once per tokenizer: ≈0.1–1 s)."""
    key = tokenizer
    cached = _tokenizers.get(key)
    if cached is not None and cached[0] == vocab_size:
        return cached[1]
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    eos = [int(t) for t in getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id]]
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise InvalidInput(
            "this model's tokenizer cannot constrain output (not a fast tokenizer)",
            "use a model with a tokenizer.json",
        )
    from llguidance.hf import from_tokenizer

    try:
        llt = from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos)
    except ValueError:  # transformers 5's TokenizersBackend is not a PreTrainedTokenizerFast
        from copy import copy

        bt = copy(backend)
        bt.no_padding()
        bt.no_truncation()
        llt = llguidance.LLTokenizer(bt.to_str(), n_vocab=vocab_size, eos_token=eos)
    _tokenizers[key] = (vocab_size, llt)
    return llt


def _digit_tokens(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Which token ids decode to digits only (once per tokenizer, ≈10 ms for 50k tokens)."""
    cached = _digits.get(tokenizer)
    if cached is not None and cached.size == vocab_size:
        return cached
    llt = ll_tokenizer(tokenizer, vocab_size)
    out = np.zeros(vocab_size, dtype=bool)
    for i in range(vocab_size):
        b = llt.decode_bytes([i])
        out[i] = bool(b) and b.isdigit()
    _digits[tokenizer] = out
    return out


class GrammarProcessor:
    """mlx-lm logits processor enforcing one grammar on one sequence.

    The first call's token context is the prompt; every later call's context ends with the
    tokens sampled since, which are fed to the matcher before the next mask is computed.
    Once the grammar is complete (the matcher stops by itself when nothing may follow) only
    end-of-sequence is allowed, so the sequence ends there.

    After MAX_DIGIT_RUN digit-only tokens in a row, digit tokens are masked too wherever the
    grammar allows anything else: a small model sampling a JSON number can otherwise write
    digits until max_tokens ("19.0796666666666781434..."), and the answer never completes.
    """

    def __init__(self, matcher: Any, eos: list[int], digits: np.ndarray):
        self.matcher = matcher
        self.eos = mx.array(eos)
        self.digits = digits  # token id -> the token is digits only
        self.digit_run = 0
        self.start: int | None = None  # context length at the first call (the prompt)
        self.fed = 0  # generated tokens fed to the matcher
        self.mask_seconds = 0.0  # time spent feeding the matcher and masking (not waiting)
        self.steps = 0
        self.reported = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        n = int(tokens.shape[-1])
        if self.start is None:
            self.start = n
        new = n - self.start - self.fed
        t0 = time.perf_counter()
        if new > 0:
            ids = tokens.reshape(-1)[n - new :].tolist()  # waits for the step that sampled them
            t0 = time.perf_counter()
            self.fed += new
            for t in ids:
                digit = t < self.digits.size and self.digits[t]
                self.digit_run = self.digit_run + 1 if digit else 0
            if not self.matcher.is_stopped():  # (the end-of-sequence token after completion)
                self.matcher.consume_tokens(ids)  # False (error state) is handled below
        if self.matcher.is_stopped() or self.matcher.is_error():
            # Complete (or, never expected, broken): end the answer rather than run free.
            if self.matcher.is_error() and not self.reported:
                self.reported = True
                log.warning(
                    "grammar failed mid-answer: %s", self.matcher.get_error().splitlines()[0]
                )
            end = mx.full(logits.shape, MASKED, dtype=logits.dtype)
            return mx.put_along_axis(
                end,
                mx.broadcast_to(self.eos, (logits.shape[0], self.eos.size)),
                mx.zeros((logits.shape[0], self.eos.size), dtype=logits.dtype),
                axis=-1,
            )
        width = logits.shape[-1]
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:width].astype(bool)
        if self.digit_run >= MAX_DIGIT_RUN:
            fewer = allowed.copy()
            fewer[: self.digits.size] &= ~self.digits[:width]
            if fewer.any():
                allowed = fewer
        out = mx.where(mx.array(allowed), logits, mx.array(MASKED, dtype=logits.dtype))
        self.mask_seconds += time.perf_counter() - t0
        self.steps += 1
        return out

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def schema_file(path: str) -> Constraint:
    """The constraint of a JSON schema file (`edgeai run --json-schema FILE`).

    Raises:
        InvalidInput: the file is missing, not JSON, or not a schema llguidance can enforce.
    """
    from pathlib import Path

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(
            f"cannot read the schema file {path}: {getattr(e, 'strerror', None) or e}",
            "give the path of a JSON Schema file",
        ) from None
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise InvalidInput(
            f"{path} is not JSON: {e}", "give the path of a JSON Schema file"
        ) from None
    return json_schema(schema, f"the schema in {path}")


def generate(
    engine: Any, prompt: Any, options: Any, constraint: Constraint, adapter: str | None = None
) -> Iterator[Event]:
    """`Engine.generate` under a constraint: the same decode loop, the grammar's processor added."""
    ids = engine.prompt_ids(prompt)
    with engine.lock, engine.adapters.use(adapter):
        gen = engine.generation(
            ids, options, processors=[constraint.processor(engine.tokenizer, engine.vocab_size)]
        )
        try:
            while gen.finish is None:
                yield from gen.advance()
        finally:
            if gen.finish is None:  # the consumer stopped early
                gen.end("cancelled")
