"""Translation batches on several CPU processes (`phenolens translate --workers N`).

Why: the UNets phenolens trains are small, and torch's intra-op threads use a CPU's cores poorly on
them (on the 2-core developer machine, 2 threads run a batch of 16 BBBC021 crops only 1.3-1.5x faster
than 1 thread); processes of fewer threads, each translating whole batches, may use them better. How
much depends on the machine (1.10x for 2 workers there, memory bandwidth being shared too:
bench/translate.py --workers-only). The main process keeps reading the sources and writing every
output and index.csv in the input's order, so resuming, provenance and the folder's guarantees are
those of a one-process run, and each batch is translated exactly as it would be there (EF-DDPM's
noise is drawn per image from the seed and its pixels, never from a process's state).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from phenolens.errors import PhenolensError

Item = TypeVar("Item")
Result = TypeVar("Result")

_MODEL = None  # the model of this worker process, loaded once by `_load`


def _load(model_dir: str, threads: int) -> None:
    global _MODEL
    from phenolens.methods.registry import load_model_for

    torch.set_num_threads(threads)
    _MODEL = load_model_for(model_dir, device="cpu")


def _call(fn: Callable, args: tuple):
    return fn(_MODEL, *args)


def check_workers(workers: int, device: str) -> None:
    if workers < 1:
        raise PhenolensError(f"--workers must be at least 1 (got {workers})")
    if workers > 1 and device != "cpu":
        raise PhenolensError(f"--workers {workers}: several processes share the CPU's cores; on {device} use "
                             "--workers 1 (one process per accelerator: `accelerate launch`)")


def threads_per_worker(workers: int) -> int:
    """The torch threads each of WORKERS processes gets: this process's threads shared out, at least 1."""
    return max(1, torch.get_num_threads() // workers)


def map_in_order(fn: Callable[..., Result], jobs: Iterable[tuple[Item, tuple]], model, model_dir: str,
                 workers: int) -> Iterator[tuple[Item, Result]]:
    """(item, fn(model, *args)) for each (item, args) of JOBS, in JOBS' order.

    With one worker FN runs here on MODEL. With more, each of WORKERS processes loads its own copy of
    the model from MODEL_DIR (spawned, not forked: a fork of a process whose OpenMP threads have run
    can hang) and at most 2 x WORKERS jobs are in flight, so memory stays bounded on a large input.
    FN and its arguments must be picklable (a module-level function; arrays, records, settings).
    """
    if workers == 1:
        for item, args in jobs:
            yield item, fn(model, *args)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_load,
                             initargs=(str(model_dir), threads_per_worker(workers))) as pool:
        pending: deque[tuple[Item, Future]] = deque()
        try:
            for item, args in jobs:
                pending.append((item, pool.submit(_call, fn, args)))
                if len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:  # an error or an interrupt: start nothing more
                future.cancel()
