"""Run independent layer solves on any ``concurrent.futures.Executor``.

Results are keyed by layer index, so they do not depend on scheduling or on the worker
count. Problems arrive from an iterator and at most ``2 * workers`` are in flight, so the
problems held in memory at once are bounded (a large model's problems are built lazily).
Joint solvers (codebooks shared across layers) take all problems at once instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)

from .solve.problem import LayerProblem, LayerSolution

Solver = Callable[[LayerProblem], LayerSolution]


def make_executor(kind: str, workers: int) -> Executor:
    """A thread (default: numpy releases the GIL) or process pool."""
    if kind == "processes":
        return ProcessPoolExecutor(max_workers=workers)
    return ThreadPoolExecutor(max_workers=workers)


def solve_all(
    problems: Iterable[tuple[int, LayerProblem]],
    solver: Solver,
    executor: Executor,
    *,
    in_flight: int = 4,
    progress: Callable[[int], None] | None = None,
) -> dict[int, LayerSolution]:
    """Solve every problem; returns {index: solution} sorted by index.

    ``solver`` must be picklable for a process pool (a module-level function or a
    ``functools.partial`` of one).
    """
    out: dict[int, LayerSolution] = {}
    pending: dict[Future, int] = {}

    def drain(block_until: int) -> None:
        while len(pending) > block_until:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for f in done:
                out[pending.pop(f)] = f.result()
                if progress:
                    progress(len(out))

    for idx, prob in problems:
        pending[executor.submit(solver, prob)] = idx
        drain(in_flight - 1)
    drain(0)
    return dict(sorted(out.items()))
