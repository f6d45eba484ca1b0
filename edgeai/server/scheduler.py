"""The one owner of the MLX model: a bounded queue, continuous batching, cancellation, keep-alive.

Every request becomes a `Job`. One worker thread loads the model on the first job and runs
every generation. A job that arrives when nothing else runs decodes alone through the
engine's own loop (`Engine.generation`, the one `edgeai run` uses: same speed, same
tokens); jobs that arrive while others run share decoding steps in mlx-lm's
`BatchGenerator` (server/batching.py), interleaved with the single stream's steps. Every
sampled token becomes an `edgeai.types.Event` for the job's consumer, through the same
`engine.decode.SequenceDecoder` in both lanes. A job
whose client went away is removed from the batch before the next step. After the last job
the model stays loaded for `keep_alive` seconds, then it is unloaded.

Other MLX work of the server (the router's encoder, embeddings) runs on the same thread
between decoding steps, through `call`.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeai import hardware
from edgeai.engine import Engine
from edgeai.engine.decode import (
    Generation,
    SequenceDecoder,
    make_processors,
    make_sampler,
    token_signals_batch,
)
from edgeai.engine.engine import cache_scope
from edgeai.engine.hidden import RowStates
from edgeai.errors import EdgeAIError
from edgeai.options import GenerationOptions
from edgeai.routing.confidence import tap_for_gate
from edgeai.server import batching
from edgeai.types import Event

# Batches of this many rows use the int8 GEMM (kernels/cpu/qmm_isa.h, kQ8GemmRows), which reads
# the repacked weights (`Hooks.prepare_batches`) when the server made them.
PANEL_ROWS = 4

log = logging.getLogger("edgeai.server")
ADMITTED = object()  # first item a job gets once its prompt is accepted


class QueueFull(Exception):
    """More jobs than the queue holds; the client should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class GenerationFailed(Exception):
    """An unexpected error while generating one job (answered with 500)."""


@dataclass
class Job:
    """One request's generation, shared between the worker thread and its consumer.

    Items handed to `put`: `ADMITTED` once the prompt is accepted, then Events (the last
    has a finish_reason), or an exception instead (EdgeAIError: the input's fault).
    """

    prompt: Any
    options: GenerationOptions
    model: str
    path: Path
    put: Callable[[Any], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    logits: dict = field(default_factory=dict)  # make_logits_processors(**logits)
    tokenizer: Any = None  # set when admitted, for rendering token strings
    prompt_tokens: int = 0
    adapter: str | None = None  # a stored LoRA adapter's name (edgeai.engine.lora)
    lora: Any = None  # that adapter, resolved when the job is admitted
    encoded: Any = None  # the checked prompt ids (or the error), when made before admission
    constraint: Any = None  # an engine.constrain.Constraint on the answer (JSON, a tool call)

    def push(self, item: Any) -> None:
        try:
            self.put(item)
        except Exception:  # the consumer is gone (closed loop): stop generating for it
            self.cancel.set()


# -- the MLX thread ------------------------------------------------------------------------

_mlx_jobs: queue.SimpleQueue | None = None
_mlx_lock = threading.Lock()


def _run_on_mlx_thread(fn: Callable[[], None]) -> None:
    """Run `fn` on the process's one MLX worker thread.

    The thread never exits: with mlx 0.32 a thread that has loaded a model and then exits
    makes the interpreter abort at shutdown ("terminate called without an active
    exception"), so schedulers take turns on one long-lived daemon thread instead.
    """
    global _mlx_jobs
    with _mlx_lock:
        if _mlx_jobs is None:
            _mlx_jobs = queue.SimpleQueue()
            jobs = _mlx_jobs

            def loop() -> None:
                while True:
                    jobs.get()()

            threading.Thread(target=loop, name="edgeai-mlx", daemon=True).start()
    _mlx_jobs.put(fn)


def _undo_layer_swaps(model: Any) -> int:
    """Give modules whose class edgeai swapped (kernel-backed layers) their mlx-lm class back.

    Kernel modules install such layers by changing an instance's class to a subclass, so
    the parameters are untouched and restoring the base class is safe. Returns how many.
    """
    n = 0
    for _, m in model.named_modules():
        cls = type(m)
        base = cls.__mro__[1] if len(cls.__mro__) > 1 else None
        if (
            cls.__module__.startswith("edgeai.")
            and base is not None
            and base.__module__.startswith("mlx_lm.")
        ):
            m.__class__ = base
            n += 1
    return n


def _processors(engine: Any, job: Job) -> list:
    """A job's logits processors: its logit_bias and penalties, then its grammar's mask (each
    job its own matcher, fed the tokens its row samples), in either lane."""
    procs = make_processors(job.logits, engine.vocab_size, engine.name)
    if job.constraint is not None:
        procs = [*procs, job.constraint.processor(engine.tokenizer, engine.vocab_size)]
    return procs


# -- the scheduler -------------------------------------------------------------------------


@dataclass
class _Loaded:
    name: str
    path: Path
    engine: Any
    generator: Any
    loaded_at: float


class Scheduler:
    """Owns the loaded model and runs every generation.

    Args:
        max_batch: most sequences decoded together.
        max_queue: most jobs waiting for a batch slot; beyond it `submit` raises QueueFull.
        keep_alive: seconds an idle model stays loaded (< 0: forever, 0: unload at once).
        metrics: a `Metrics` to update (optional).
    """

    def __init__(
        self,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        keep_alive: float = 300.0,
        metrics: Any = None,
    ):
        self.max_batch = max(1, max_batch)
        self.max_queue = max(0, max_queue)
        self.keep_alive = keep_alive
        self.metrics = metrics
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: dict[int, tuple[Job, SequenceDecoder]] = {}  # batch uid -> its job
        self._solo: tuple[Job, Generation] | None = None  # the job decoding alone
        self.lanes = {"alone": 0, "batched": 0}  # jobs admitted to each lane, for `edgeai ps`
        self._loaded: _Loaded | None = None
        self._pack_need = 0  # the loaded weights' bytes, until batches get repacked ones
        # Hidden states of batched rows, for a confidence probe (when the model has a tap).
        self._states = RowStates(lambda: self._loaded.engine.tap if self._loaded else None)
        self._idle_since = time.monotonic()
        self._stopping = False
        self._stopped = threading.Event()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        # Imported here, on the caller's thread: mlx-lm makes its generation stream at
        # import time, and that must not happen on a thread that may exit.
        import mlx_lm.generate  # noqa: F401

    # -- public API (any thread) -------------------------------------------------------

    def start(self) -> None:
        _run_on_mlx_thread(self._run)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every job, unload the model and end the worker loop."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._stopped.wait(timeout)

    def submit(
        self,
        prompt: Any,
        options: GenerationOptions,
        model: str,
        path: Path,
        put: Callable[[Any], None],
        cancel: threading.Event | None = None,
        logits: dict | None = None,
        adapter: str | None = None,
        constraint: Any = None,
    ) -> Job:
        """Queue a generation; its items are handed to `put` from the worker thread.

        Args:
            prompt: text, token ids or chat messages.
            options: sampling and stopping options.
            model, path: the model's name and MLX directory.
            put: receives ADMITTED, then Events, or an exception (from the worker thread).
            cancel: set it to stop the job before its next decoding step.
            logits: logit_bias / presence_penalty / frequency_penalty (mlx-lm's processors).
            adapter: a stored LoRA adapter for this job only (its batch row gets its weights).
            constraint: an `engine.constrain.Constraint` the answer must follow (a grammar).

        Raises:
            QueueFull: the queue is full (answer 503 with Retry-After).
        """
        job = Job(
            prompt, options, model, Path(path), put, cancel or threading.Event(), logits or {}
        )
        job.adapter = adapter
        job.constraint = constraint
        self._encode_here(job)
        with self._cv:
            if self._stopping:
                raise QueueFull(5)
            if (
                len(self._waiting) >= self.max_queue
                and self._running() + len(self._waiting) >= self.max_batch
            ):
                raise QueueFull(self._retry_after())
            self._waiting.append(job)
            self._cv.notify_all()
        return job

    def _encode_here(self, job: Job) -> None:
        """Tokenize on the caller's thread when the job's model is loaded: a huge prompt then
        costs its own request's time, not a pause of every stream on the MLX thread."""
        loaded = self._loaded
        if loaded is None or loaded.path != job.path:
            return  # the worker encodes it once the model is loaded
        try:
            job.encoded = loaded.engine.prompt_ids(job.prompt)
        except EdgeAIError as e:
            job.encoded = e

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the MLX thread between decoding steps; its Future has the result.

        Never wait on the Future from the MLX thread itself.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                fut.set_exception(QueueFull(5))
                return fut
            self._calls.append((fn, fut))
            self._cv.notify_all()
        return fut

    def _run_calls(self) -> None:
        # Only the calls queued before this turn: one queued meanwhile (the next chunk of the
        # same work) waits for the next turn, after a decoding step, so calls cannot starve it.
        for _ in range(len(self._calls)):
            fn, fut = self._calls.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, never kills the loop
                fut.set_exception(e)

    def status(self) -> dict[str, Any]:
        """What is loaded, for how long, and how busy the scheduler is (`edgeai ps`)."""
        with self._cv:
            loaded = self._loaded
            active, waiting = self._running(), len(self._waiting)
            idle_since = self._idle_since
        models = []
        if loaded is not None:
            expires = None
            if not active and not waiting and self.keep_alive >= 0:
                expires = max(0.0, idle_since + self.keep_alive - time.monotonic())
            models.append(
                {
                    "name": loaded.name,
                    "path": str(loaded.path),
                    "loaded_seconds": round(time.monotonic() - loaded.loaded_at, 1),
                    "expires_in_seconds": None if expires is None else round(expires, 1),
                    "kernel": getattr(getattr(loaded.engine, "kernel", None), "name", None),
                    "kernel_reason": getattr(
                        getattr(loaded.engine, "kernel", None), "reason", None
                    ),
                    "context_length": loaded.engine.context_length,
                    "prompt_cache": loaded.engine.prompt_cache.stats(),
                }
            )
        return {
            "models": models,
            "active": active,
            "waiting": waiting,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "lanes": dict(self.lanes),
            "tokens_per_second": round(self.recent_tps(), 2),
        }

    def queue_depth(self) -> int:
        return len(self._waiting)

    def active_count(self) -> int:
        return self._running()

    def _running(self) -> int:
        return len(self._active) + (self._solo is not None)

    def recent_tps(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds, all jobs together."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    def _retry_after(self) -> int:
        tps = self.recent_tps()
        backlog = len(self._waiting) * 64  # a rough guess of tokens ahead of a new job
        return max(1, min(60, math.ceil(backlog / tps))) if tps > 0 else 2

    # -- the worker loop (MLX thread only) ----------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                new = self._next_jobs()
                if new is None:
                    break
                self._run_calls()
                if new:
                    self._admit(new)
                self._reap_cancelled()
                if self._solo is not None:
                    self._solo_step()
                if self._active:
                    self._step()
        finally:
            self._shutdown()

    def _next_jobs(self) -> list[Job] | None:
        """Block until there is work; unload an idle model when its keep-alive ends."""
        with self._cv:
            while (
                not self._stopping and not self._running() and not self._waiting and not self._calls
            ):
                timeout = None
                if self._loaded is not None and self.keep_alive >= 0:
                    timeout = self._idle_since + self.keep_alive - time.monotonic()
                    if timeout <= 0:
                        self._unload()
                        continue
                self._cv.wait(timeout)
            if self._stopping:
                return None
            jobs: list[Job] = []
            # One model per batch: the running batch's, else the oldest waiting job's. A job for
            # another model waits for the batch to drain (oldest first: no starvation).
            current = self._loaded.path if self._loaded is not None and self._running() else None
            while self._waiting and self._running() + len(jobs) < self.max_batch:
                job = self._waiting[0]
                if current is not None and job.path != current:
                    break
                current = job.path
                jobs.append(self._waiting.popleft())
            return jobs

    def _admit(self, jobs: list[Job]) -> None:
        """Load the model if needed, encode the prompts and insert them into the batch."""
        for job in jobs:
            if job.cancel.is_set():
                job.push(Event(finish_reason="cancelled"))
                continue
            try:
                loaded = self._ensure_model(job)
                if isinstance(job.encoded, EdgeAIError):
                    raise job.encoded
                ids = (
                    job.encoded if job.encoded is not None else loaded.engine.prompt_ids(job.prompt)
                )
                # An unknown or mismatched adapter fails this job only; the version read now
                # serves the whole request.
                job.lora = loaded.engine.adapters.get(job.adapter) if job.adapter else None
            except EdgeAIError as e:
                job.push(e)
                continue
            except Exception as e:  # a model that fails to load fails its jobs, not the server
                job.push(GenerationFailed(f"could not start generation: {e}"))
                continue
            job.tokenizer = loaded.engine.tokenizer
            job.prompt_tokens = len(ids)
            if self._solo is None and not self._active and len(jobs) == 1 and not self._waiting:
                self._start_solo(loaded.engine, job, ids)
                continue
            engine = loaded.engine
            max_tokens = engine.max_new_tokens(ids, job.options)
            job.encoded = ids
            if self._pack_need and len(self._active) + 1 >= PANEL_ROWS:
                # Only now: the panels cost the weights' size again, and a server that sees
                # one client at a time (a desktop app) never needs them.
                self._prepare_batches(engine, self._pack_need)
                self._pack_need = 0
            cache, reused = engine.prompt_cache.take(cache_scope(job.lora), ids)
            try:
                (uid,) = loaded.generator.insert(
                    [ids[reused:]],
                    max_tokens=[max_tokens],
                    caches=[cache] if cache is not None else None,
                    all_tokens=[ids[:reused]],
                    samplers=[make_sampler(job.options, engine.vocab_size)],
                    logits_processors=[_processors(engine, job)],
                )
            except EdgeAIError as e:
                job.push(e)
                continue
            except Exception as e:
                job.push(GenerationFailed(f"could not start generation: {e}"))
                continue
            dec = SequenceDecoder(engine.tokenizer, job.options, len(ids))
            dec.stats.cached_tokens = reused
            self._active[uid] = (job, dec)
            self.lanes["batched"] += 1
            job.push(ADMITTED)
            self._count_prompt(len(ids), reused)

    def _start_solo(self, engine: Engine, job: Job, ids: list[int]) -> None:
        """Decode `job` alone through the engine's own loop, with its adapter on every row."""
        try:
            processors = _processors(engine, job)
            gen = engine.generation(
                ids,
                job.options,
                model=engine.adapters.fixed(job.lora),
                processors=processors,
                scope=cache_scope(job.lora),
            )
        except EdgeAIError as e:
            job.push(e)
            return
        self._solo = (job, gen)
        self.lanes["alone"] += 1
        job.push(ADMITTED)
        self._count_prompt(len(ids), gen.reused)

    def _count_prompt(self, tokens: int, reused: int) -> None:
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(tokens - reused)
            (self.metrics.cache_hits if reused else self.metrics.cache_misses).inc()
            self.metrics.cached_tokens.inc(reused)

    def _solo_step(self) -> None:
        """One token of the job decoding alone (its first step also processes the prompt)."""
        job, gen = self._solo
        if self._loaded is not None:  # alone, or taking turns with a batch
            self._loaded.engine.hooks.batching(bool(self._active))
        if job.cancel.is_set():
            events = [gen.end("cancelled")]
            if self.metrics is not None:
                self.metrics.cancelled.inc()
        else:
            try:
                events = gen.advance()
            except Exception as e:  # noqa: BLE001 - fails this job, never the server
                self._solo = None
                job.push(GenerationFailed(f"generation failed: {e}"))
                self._mark_idle()
                return
            self._count_tokens(1)
        for ev in events:
            job.push(ev)
        if gen.finish is not None:
            self._solo = None
            self._mark_idle()

    def _count_tokens(self, n: int) -> None:
        self._recent.append((time.monotonic(), n))
        while self._recent and time.monotonic() - self._recent[0][0] > 30:
            self._recent.popleft()
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(n)

    def _reap_cancelled(self) -> None:
        gone = [uid for uid, (job, _) in self._active.items() if job.cancel.is_set()]
        if not gone:
            return
        self._loaded.generator.remove(gone)
        for uid in gone:
            self._states.drop(uid)
            job, dec = self._active.pop(uid)
            job.push(dec.finish("cancelled"))
            if self.metrics is not None:
                self.metrics.cancelled.inc()
        self._mark_idle()

    def _step(self) -> None:
        """One batched decoding step; each sampled token becomes an Event for its job."""
        gen = self._loaded.generator
        self._loaded.engine.hooks.batching(True)
        try:
            _, responses = gen.next()
            signals = (
                token_signals_batch(
                    [r.logprobs for r in responses],
                    [r.token for r in responses],
                    [self._active[r.uid][1].top_n for r in responses],
                    batching.entropies(gen, [r.uid for r in responses]),
                )
                if responses
                else []
            )
        except Exception as e:  # the batch's state is unknown now: fail its jobs, start afresh
            self._fail_all(GenerationFailed(f"generation failed: {e}"))
            return
        self._count_tokens(len(responses))
        done = []
        for r, sig in zip(responses, signals):
            job, dec = self._active[r.uid]
            self._states.token(r.uid)
            if dec.t_first is None:  # its prompt is all in the cache now: keep it for reuse
                self._keep_prompt(r.uid, job)
            try:
                events, finish = dec.step(r.token, sig, last=r.finish_reason is not None)
            except Exception as e:  # one job's failure must not touch the others
                job.push(GenerationFailed(f"generation failed: {e}"))
                done.append((r.uid, r.finish_reason is None))
                continue
            for ev in events:
                job.push(ev)
            if finish is not None:
                end = dec.finish(finish)
                end.hidden = self._states.states(r.uid)
                job.push(end)
                done.append((r.uid, r.finish_reason is None))
        still_in_batch = [uid for uid, inside in done if inside]
        if still_in_batch:
            gen.remove(still_in_batch)
        for uid, _ in done:
            self._active.pop(uid, None)
            self._states.drop(uid)
        if done:
            self._mark_idle()

    def _keep_prompt(self, uid: int, job: Job) -> None:
        """Put a batched row's prompt KV into the prompt cache (a copy; the row goes on)."""
        engine = self._loaded.engine
        try:
            cache, _ = self._loaded.generator.extract_cache([uid])[uid]
        except Exception as e:  # noqa: BLE001 - reuse is an optimisation, never a failure
            log.debug("prompt cache: could not extract row %s: %s", uid, e)
            return
        cached = max((getattr(c, "offset", 0) for c in cache), default=0)
        engine.prompt_cache.put(cache_scope(job.lora), job.encoded, cache, cached)

    def _fail_all(self, error: Exception) -> None:
        for uid, (job, _) in self._active.items():
            self._states.drop(uid)
            job.push(error)
        self._active.clear()
        if self._solo is not None:
            self._solo[0].push(error)
            self._solo = None
        if self._loaded is not None:
            self._loaded.generator = self._new_generator(self._loaded.engine, self._states)
        self._mark_idle()

    def _mark_idle(self) -> None:
        with self._cv:
            if not self._running():
                self._idle_since = time.monotonic()

    # -- model lifetime ----------------------------------------------------------------

    def _ensure_model(self, job: Job) -> _Loaded:
        if self._loaded is not None and self._loaded.path == job.path:
            return self._loaded
        self._unload()  # one model at a time: a new one needs the memory
        need = sum(f.stat().st_size for f in job.path.glob("*.safetensors"))
        hardware.check_memory(need, job.model, hint="close other programs or use a smaller model")
        engine = Engine.load(job.path, job.model)
        problem = self._batch_problem(engine)
        if problem is not None and _undo_layer_swaps(engine.model):
            # Custom layer kernels (attention/RoPE) that cannot take per-row cache offsets:
            # keep the custom matmuls, use mlx-lm's own layers.
            log.warning(
                "custom layer kernels fail batched decoding (%s); using mlx-lm's layers", problem
            )
            engine.kernel.reason = (
                f"{engine.kernel.reason}; layer kernels off for batching ({problem})"
            )
            problem = self._batch_problem(engine)
        if problem is not None and getattr(engine.kernel, "name", "builtin") != "builtin":
            # A custom kernel that cannot decode ragged batches: fall back rather than fail.
            log.warning(
                "kernel %s fails batched decoding (%s); using the builtin one",
                engine.kernel.name,
                problem,
            )
            engine = Engine.load(job.path, job.model, kernel="builtin")
            engine.kernel.reason = f"custom kernel failed batched decoding: {problem}"
        tap_for_gate(engine)  # after any layer swaps are undone: the tap wraps the final class
        self._pack_need = need  # repacked when batches first reach PANEL_ROWS (_admit)
        self._loaded = _Loaded(
            job.model, job.path, engine, self._new_generator(engine, self._states), time.monotonic()
        )
        # The model's and tokenizer's objects live until the unload: keep them out of the
        # cyclic GC's passes, which walked all of them (~9% of a 16-row batch's CPU time).
        gc.freeze()
        if self.metrics is not None:
            self.metrics.model_loads.inc()
        return self._loaded

    def _prepare_batches(self, engine: Any, weights: int) -> None:
        """Let the kernels repack the weights for batched decoding (about the weights' size
        again), where that memory is free; without it batches still run, slower."""
        try:
            hardware.check_memory(weights, engine.name)
        except EdgeAIError as e:
            log.warning("batches decode without repacked weights: %s", e)
            return
        engine.hooks.prepare_batches(engine.model)

    def _batch_problem(self, engine: Any) -> str | None:
        """Why this engine cannot decode a ragged batch (per-row cache offsets), or None."""
        gen = self._new_generator(engine)
        try:
            gen.insert([[1, 2, 3], [4]], max_tokens=[2, 2])
            for _ in range(4):
                gen.next()
        except Exception as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return None

    def _new_generator(self, engine: Any, states: RowStates | None = None) -> Any:
        eos = [[int(t)] for t in engine.tokenizer.eos_token_ids]
        return batching.for_engine(
            engine,
            self._lora_of,
            states,
            stop_tokens=eos,
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(self.max_batch, 8),
        )

    def _lora_of(self, uid: int) -> Any:
        entry = self._active.get(uid)
        return entry[0].lora if entry else None

    def _unload(self) -> None:
        if self._loaded is None:
            return
        self._loaded = None
        self._pack_need = 0
        gc.unfreeze()  # the model's cycles are garbage now: let the collector see them
        gc.collect()
        import mlx.core as mx

        mx.clear_cache()

    def _shutdown(self) -> None:
        with self._cv:
            waiting = list(self._waiting)
            self._waiting.clear()
        for job in waiting:
            job.push(QueueFull(5))
        while self._calls:
            self._calls.popleft()[1].cancel()
        for job, dec in self._active.values():
            job.push(dec.finish("cancelled"))
        self._active.clear()
        if self._solo is not None:
            self._solo[0].push(self._solo[1].end("cancelled"))
            self._solo = None
        self._unload()
        self._stopped.set()
