"""Dataset input and output shared by every command."""

import contextlib
import os
import sys


def lean_arrow() -> None:
    """Process-wide Arrow settings for a command: smaller peak memory, same results.

    - Arrow's buffers go to jemalloc, which hands freed memory back sooner than the default
      mimalloc (a streaming copy of wide rows peaks about 50 MiB lower), and hands it back at
      once rather than after a second's decay: a stream frees a batch's buffers as fast as it
      allocates the next one's, so pages kept for reuse only add to the peak (10 to 35 MiB
      lower in `tests/bench/bench_light.py`, at the same speed). A pool chosen with
      ARROW_DEFAULT_MEMORY_POOL stays.
    - pyarrow looks for pandas once, on its first conversion, to recognise pandas objects, and
      that import alone costs about 45 MiB and 0.2 s. It looks here, with pandas hidden, so
      it is not imported for nothing. A library that imports pandas itself still can, and an
      explicit conversion (`to_pandas`, `from_pandas`) imports it as usual.
    """
    import pyarrow as pa

    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        with contextlib.suppress(NotImplementedError):  # a pyarrow built without jemalloc
            pa.set_memory_pool(pa.jemalloc_memory_pool())
            pa.jemalloc_set_decay_ms(0)
    if "pandas" not in sys.modules:
        sys.meta_path.insert(0, _NoPandas)
        try:
            pa.array([])
        finally:
            sys.meta_path.remove(_NoPandas)


class _NoPandas:
    """An import hook under which `import pandas` raises ImportError."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "pandas":
            raise ImportError("pandas is hidden from pyarrow's first look")
        return None
