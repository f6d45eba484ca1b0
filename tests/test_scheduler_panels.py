"""The server repacks the weights for its batches' int8 GEMM only once a batch needs them.

Its own module: schedulers take turns on the process's one MLX thread, so this one must not
share a module with another that is still running.
"""

from __future__ import annotations

import threading
import time

import pytest
from test_scheduler_lanes import PROMPTS, _lanes, _no_eos, _start_blocker, _submit

from edgeai.engine import Engine
from edgeai.options import GenerationOptions
from edgeai.server.scheduler import Scheduler


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.load(tiny_model)


def _drain(q) -> None:
    from edgeai.errors import EdgeAIError

    while True:
        item = q.get(timeout=60)
        if isinstance(item, EdgeAIError):
            raise item
        if getattr(item, "finish_reason", None) is not None:
            return


def test_weights_are_repacked_only_once_batches_reach_the_gemms_rows(engine, tiny_model):
    from edgeai.kernels import cpu as kc
    from edgeai.server.scheduler import PANEL_ROWS

    if not kc.extension().int8_panels():
        pytest.skip("no int8 GEMM on panels on this CPU: nothing is repacked")
    s = Scheduler(max_batch=8, max_queue=16, keep_alive=-1)  # its own: nothing packed yet
    s.start()
    stops = []
    try:
        blocker, stop = _start_blocker(s, engine, tiny_model, _lanes(s))
        stops.append(stop)
        model = s._loaded.engine.model

        def packed() -> bool:
            return any("_panels" in m.__dict__ for _, m in model.named_modules())

        def join() -> None:
            stops.append(threading.Event())
            n = _lanes(s)["batched"]
            opts = GenerationOptions(max_tokens=1500)
            _submit(s, tiny_model, PROMPTS[1], opts, _no_eos(engine), cancel=stops[-1])
            while _lanes(s)["batched"] == n:
                time.sleep(0.005)

        for _ in range(PANEL_ROWS - 1):
            join()
        assert not packed()  # a server below the GEMM's rows keeps one copy of the weights
        join()
        assert packed()
        # While batches decode, the kernel's idle workers spin briefly (the Python thread
        # building each step needs the core); a lone stream gets them back at hand.
        assert kc.extension().pool_spin() == kc.SPIN_US[True]
        for ev in stops:
            ev.set()
        while s._active or s._solo is not None:
            time.sleep(0.01)
        alone = _lanes(s)["alone"]
        _drain(_submit(s, tiny_model, PROMPTS[2], GenerationOptions(max_tokens=4)))
        assert _lanes(s)["alone"] == alone + 1
        assert kc.extension().pool_spin() == kc.SPIN_US[False]
    finally:
        for ev in stops:
            ev.set()
        s.stop()
