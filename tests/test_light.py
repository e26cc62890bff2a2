"""Steps that run no model stay light: they never import torch or the model libraries."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Runs the CLI in this interpreter, then prints which model libraries it loaded on the last line.
RUN = (
    "import sys, runpy; sys.argv = ['mmtools', *sys.argv[1:]]\n"
    "try: runpy.run_module('mmtools', run_name='__main__')\n"
    "except SystemExit as e: code = e.code\n"
    "else: code = 0\n"
    "heavy = {'torch', 'open_clip', 'transformers', 'torchvision', 'ray'}\n"
    "print(code, sorted(heavy & set(sys.modules)))"
)


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    n = 300
    table = pa.table(
        {
            "id": [f"{i:04d}" for i in range(n)],
            "text": [f"caption {i % 100}" for i in range(n)],  # each caption three times
            "clip_score": pa.array([i / n for i in range(n)], pa.float32()),
            "image_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array([float(i % 7) for i in range(n * 8)], pa.float16()), 8
            ),
        }
    )
    pq.write_table(table, d / "part-00000.parquet")
    return d


@pytest.mark.parametrize(
    ("args", "rows"),
    [
        (["filter", "{in}", "--where", "clip_score >= 0.5", "-o", "{out}"], 150),
        (["dedup", "{in}", "-m", "exact", "-o", "{out}"], 100),
        (["stats", "{in}"], None),
    ],
)
def test_non_model_commands_import_no_torch(data, tmp_path, args, rows):
    out = tmp_path / "out"
    argv = [a.format(**{"in": data, "out": out}) for a in args]
    proc = subprocess.run(
        [sys.executable, "-c", RUN, *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stderr
    if rows is not None:
        kept = pq.read_table(out, columns=["id"])
        assert kept.num_rows == rows
