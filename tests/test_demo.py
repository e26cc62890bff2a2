"""`mmtools demo` end to end at a reduced size: the report's numbers against the planted truth."""

from __future__ import annotations

import json

import pytest
from conftest import mmtools
from PIL import Image

SHAPES = pytest.importorskip("mmtools.models.shapes")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not SHAPES.weights_path().exists():
        pytest.skip("mmtools-shapes weights not built")
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = mmtools("demo", out, "--rows", 200, "--json", timeout=900)
    return out, json.loads(proc.stdout)


def test_planted_mismatches_are_removed(report):
    _, rep = report
    assert rep["mismatched"]["planted"] == 30
    assert rep["mismatched"]["precision"] >= 0.9 and rep["mismatched"]["recall"] >= 0.9


def test_planted_duplicates_are_removed(report):
    _, rep = report
    assert rep["exact_duplicates"]["removed"] == rep["exact_duplicates"]["planted"] == 10
    assert rep["near_duplicates"]["removed"] >= 0.8 * rep["near_duplicates"]["planted"]


def test_every_corrupt_file_is_a_reject(report):
    _, rep = report
    assert rep["corrupt"]["rejected"] == rep["corrupt"]["planted"] == 6
    assert sum(rep["rejects"].values()) == 6


def test_outputs_exist(report):
    out, rep = report
    assert (out / "final" / "_manifest.json").exists()
    assert rep["rows"]["final"] > rep["rows"]["deduped"]  # mixup added rows
    plots = sorted((out / "plots").glob("*.png"))
    assert plots
    with Image.open(plots[0]) as im:
        im.verify()
    assert json.loads((out / "report.json").read_text()) == rep


def test_demo_refuses_a_non_empty_directory(report):
    out, _ = report
    proc = mmtools("demo", out, check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr.decode()
