"""The command line itself: fast help, documented commands, exit codes, error style."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer.main
from conftest import MMTOOLS, mmtools

from mmtools.cli import app
from mmtools.errors import EXIT_CODES, exit_code_table

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = sorted(typer.main.get_command(app).commands)


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, runpy; sys.argv=['mmtools','--help']\n"
        "try: runpy.run_module('mmtools', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "heavy = {'torch','open_clip','ray','PIL','polars','transformers','librosa'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert time.monotonic() - t0 < 5
    assert out.stdout.decode().strip().splitlines()[-1] == "[]"


def test_a_run_builds_only_its_own_command(tmp_path):
    """Each command's module is imported when that command runs, not on every start."""
    pq.write_table(pa.table({"id": ["a", "b"]}), tmp_path / "a.parquet")
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['mmtools', 'head', '-n', '1', {str(tmp_path)!r}]\n"
        "try: runpy.run_module('mmtools', run_name='__main__')\n"
        "except SystemExit as e: assert not e.code, e.code\n"
        "print(sorted(m for m in sys.modules if m.startswith('mmtools.cli.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    loaded = out.stdout.decode().strip().splitlines()[-1]
    assert loaded == "['mmtools.cli.common', 'mmtools.cli.head', 'mmtools.cli.options']"


def test_a_mistyped_command_is_named_with_the_closest_ones():
    proc = subprocess.run([*MMTOOLS, "filtr"], capture_output=True, timeout=60)
    assert proc.returncode == 2
    assert "No such command 'filtr'. Did you mean 'filter'?" in proc.stderr.decode()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    out = mmtools(command, "--help").stdout.decode()
    assert re.search(rf"Example: .*mmtools {command}\b", out), out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_in_the_readme(command):
    text = README.read_text()
    assert re.search(rf"^### `mmtools {command}`", text, re.M), f"README lacks {command}"
    assert re.search(rf"mmtools {command}\b", text.split(f"### `mmtools {command}`")[1])


def test_the_readme_exit_code_table_is_exit_codes():
    text = README.read_text()
    section = text.split("## Exit codes", 1)[1]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == exit_code_table()
    assert [int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)] == list(EXIT_CODES)


def test_main_help_ends_with_the_exit_code_table():
    out = mmtools("--help").stdout.decode()
    listed = out.split("Exit codes:", 1)[1].strip().splitlines()
    assert [line.split(None, 1) for line in listed] == [
        [str(code), text] for code, text in EXIT_CODES.items()
    ]


def test_python_dash_m_and_console_script_agree():
    via_module = mmtools("--help").stdout
    via_script = subprocess.run(
        [str(Path(sys.executable).parent / "mmtools"), "--help"], capture_output=True, timeout=60
    ).stdout
    assert via_module == via_script


def test_usage_error_exit_code():
    proc = subprocess.run([*MMTOOLS, "ingest"], capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"Missing argument" in proc.stderr


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = mmtools("ingest", tmp_path / "missing", "-o", tmp_path / "o", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert err == f"mmtools ingest: error: input {tmp_path / 'missing'} does not exist\n"


def _options() -> dict[str, set[str]]:
    import typer.main

    commands = typer.main.get_command(app).commands
    return {
        name: {o for p in c.params for o in [*p.opts, *p.secondary_opts]}
        for name, c in commands.items()
    }


def test_every_dataset_command_takes_the_shared_options():
    """README: every dataset command takes INPUT... and the shared options; model steps add
    the model options, random steps --seed."""
    shared = {"-o", "--output", "--overwrite", "--shard-rows", "--shard-bytes", "--batch-size"}
    shared |= {"--engine", "-q", "--quiet", "-v", "--verbose", "--json", "--wait-lock"}
    shared |= {"--max-reject-rate", "--max-drop-rate", "--no-ledger", "inputs"}
    options = _options()
    dataset = sorted(name for name, found in options.items() if "--shard-rows" in found)
    assert dataset == ["dedup", "embed", "export", "filter", "ingest", "mixup", "rewrite", "score"]
    for name in dataset:
        wanted = shared - {"--engine"} if name == "export" else shared  # export: local only
        assert wanted <= options[name], (name, wanted - options[name])
    for name in ("embed", "score"):
        assert {"--model", "--pretrained", "--device", "--precision"} <= options[name], name
    for name in ("dedup", "mixup", "rewrite"):
        assert "--seed" in options[name], name


def _on_one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


@pytest.mark.parametrize(("command", "default"), [("ingest", 4), ("embed", 1), ("mixup", 1)])
def test_thread_defaults_count_the_cpus_the_process_may_use(command, default):
    """Pinned to one CPU (taskset, a container's cpuset), a command's default --workers is
    sized for that one CPU, not for every CPU of the machine."""
    proc = subprocess.run(
        [*MMTOOLS, command, "--help"],
        capture_output=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=_on_one_cpu,
        check=True,
    )
    help_text = " ".join(proc.stdout.decode().split())
    workers = re.search(r"--workers <int range> (.*?)\]", help_text).group(1)
    assert f"[default: {default};" in workers
