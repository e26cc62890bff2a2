"""The local executor: the steps run in this process, one batch after another through each."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import pyarrow as pa

from mmtools.io.protocols import Source
from mmtools.step import GlobalStep, Result, Step


class LocalExecutor:
    """Run the steps in this process (steps overlap their own work with worker threads)."""

    def setup(self, steps: list[Step]) -> None:
        """Load every step's resources here."""
        for step in steps:
            step.setup()

    def scan(self, source: Source, step: GlobalStep, batch_size: int) -> None:
        """Pass 1: the keys of every batch, in input order, then the decision."""
        for batch in source.batches(columns=list(step.scan_columns), batch_size=batch_size):
            step.scan(step.keys(batch))
        step.finish_scan()

    def results(
        self, source: Source, steps: list[Step], start: int, batch_size: int
    ) -> Iterator[tuple[int, Result]]:
        """Each input batch from row `start` through every step, in order."""
        items = (
            (batch.num_rows, Result(batch))
            for batch in source.batches(batch_size=batch_size, skip_rows=start)
        )
        for step in steps:
            items = _apply(step, items)
        return items

    def close(self, steps: list[Step]) -> None:
        """Release every step's resources."""
        for step in steps:
            step.close()


def _apply(step: Step, items: Iterator[tuple[int, Result]]) -> Iterator[tuple[int, Result]]:
    """Run `step` over the batches of `items`, each result merged into the one before."""
    pending: deque[tuple[int, Result]] = deque()

    def feed() -> Iterator[pa.RecordBatch]:
        for rows, res in items:
            pending.append((rows, res))
            yield res.batch

    for res in step.run(feed()):
        rows, before = pending.popleft()
        res.check(before.batch.num_rows, step.name, step.ledger)
        yield rows, before.then(res)
