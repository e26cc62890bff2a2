"""README claims about the command line: its help, its defaults, its errors, and the tasks,
recipes and figures around it, checked against the real commands, files and Justfile."""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer.main
from conftest import MMTOOLS, image_bytes, make_image_folder, mmtools, read_dataset
from llm_server import LLMServer
from typer.testing import CliRunner

from mmtools import columns as C
from mmtools import engines
from mmtools.cli import app
from mmtools.errors import EXIT_DATA, EXIT_DRIFT, EXIT_USAGE, DriftError, UsageError
from mmtools.io.dataset import DatasetSink, read_dropped
from mmtools.io.source import Source
from mmtools.sizes import human_bytes
from mmtools.steps.dedup.step import Dedup, DedupConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PROSE = " ".join(README.split())  # the README with its line breaks undone
CLI = typer.main.get_command(app)
COMMANDS = sorted(CLI.commands)
STEP_COMMANDS = ["dedup", "embed", "filter", "ingest", "mixup", "rewrite", "score"]


def parse(line: str) -> dict:
    """The values of the options of `line` (`mmtools COMMAND ...`) as the command line reads
    them; raises when the line does not parse (an unknown option, a bad value, a missing
    argument)."""
    args = shlex.split(line)
    assert args[0] == "mmtools" and args[1] in CLI.commands, line
    with CLI.commands[args[1]].make_context(args[1], args[2:]) as ctx:
        return ctx.params


def run(*args, code: int = 0):
    """`mmtools ARGS` run in this process; its exit code must be `code`."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def help_paragraphs(*args: str) -> list[str]:
    """`mmtools ARGS --help` in paragraphs, each on one line (the wrapping undone)."""
    paragraphs = re.split(r"\n\s*\n", run(*args, "--help").output.strip())
    return [" ".join(line.strip() for line in p.splitlines()) for p in paragraphs]


# -- help, and the README's command lines --------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_opens_with_one_sentence_then_an_example_that_parses(command):
    usage, summary, example, *_ = help_paragraphs(command)
    assert usage.startswith(f"Usage: mmtools {command} ")
    assert summary.endswith(".") and ". " not in summary, summary
    assert example.startswith("Example: mmtools "), example
    # A pipe's stages and an "(also: ...)" alternative are command lines of their own.
    also = re.fullmatch(r"Example: (.*?)\s+\(also: (.*)\)", example)
    lines = [also[1], also[2]] if also else [example.removeprefix("Example: ")]
    stages = [stage.strip() for line in lines for stage in line.split(" | ")]
    assert command in [shlex.split(stage)[1] for stage in stages], example
    for stage in stages:
        parse(stage)


def test_the_readme_demo_command_line_sets_rows_overwrite_and_json():
    line = "mmtools demo demo-out/ --rows 2000 --overwrite --json"
    assert f"\n{line}\n" in README
    params = parse(line)
    assert (params["directory"], params["rows"], params["overwrite"], params["json"]) == (
        Path("demo-out"),
        2000,
        True,
        True,
    )


def test_export_refuses_engine_and_only_the_step_commands_take_it(tmp_path):
    proc = mmtools("export", tmp_path / "ds", "--engine", "ray", "-o", tmp_path / "out",
                   check=False)  # fmt: skip
    assert proc.returncode == EXIT_USAGE
    assert "No such option: --engine" in proc.stderr.decode()
    assert not (tmp_path / "out").exists()
    engine = sorted(
        n for n, c in CLI.commands.items() if any("--engine" in p.opts for p in c.params)
    )
    assert engine == STEP_COMMANDS


# -- dedup --------------------------------------------------------------------------------


def test_minhash_threshold_defaults_to_0_6_from_the_command_line_to_the_step(tmp_path):
    help_text = " ".join(" ".join(help_paragraphs("dedup")).split())
    assert "--threshold <float> minhash: Jaccard similarity of word shingles. [default: 0.6]" in (
        help_text
    )
    # b's word pairs share 4 of 6 with a's: Jaccard 0.67, a duplicate at 0.6 (not at 0.7).
    texts = ["a cat on a mat today", "a cat on a mat now", "something else entirely"]
    pq.write_table(pa.table({C.ID: ["a", "b", "c"], C.TEXT: texts}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    args = ["dedup", str(tmp_path / "in.parquet"), "-m", "minhash", "-o", str(out), "-q"]
    run(*args)
    # The fingerprint holds the options of the step that ran (its config, as a dict).
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["fingerprint"]["params"]["threshold"] == 0.6
    assert manifest["dropped"] == {"minhash": 1}


INDEX_METHODS = ("phash", "minhash", "semantic")


def index_input(path: Path, model: str) -> Path:
    """Six rows with a caption, an image and an image embedding made by `model`; no two alike
    by any method."""
    n, dim = 6, 16
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    table = pa.table(
        {
            C.ID: [f"r{i}" for i in range(n)],
            C.TEXT: [f"caption number {i} of a test" for i in range(n)],
            C.IMAGE: C.media_array([image_bytes(i) for i in range(n)], [None] * n),
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
        }
    )
    info = {C.IMAGE_EMBEDDING: {"model": model, "pretrained": "none"}}
    pq.write_table(
        table.replace_schema_metadata(C.with_metadata(table.schema, info).metadata), path
    )
    return path


def dedup_run(data: Path, out: Path, **config) -> None:
    step = Dedup(DedupConfig(methods=INDEX_METHODS, **config))
    engines.run("dedup", Source([str(data)]), [step], DatasetSink(str(out)), quiet=True)


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> Path:
    """A dedup index made by one phash + minhash + semantic run with default settings."""
    root = tmp_path_factory.mktemp("seen")
    dedup_run(index_input(root / "day1.parquet", "model-a"), root / "day1", index=str(root / "idx"))
    return root


MINHASH = {"threshold": 0.6, "num_perm": 128, "shingle": 2, "seed": 0}
SEMANTIC = {"column": "image_embedding", "eps": 0.05, "dim": 16, "model": "model-a"}


@pytest.mark.parametrize(
    "change, method, then, now",
    [
        (
            {"max_distance": 8},
            "phash",
            {"max_distance": 10, "flip": False},
            {"max_distance": 8, "flip": False},
        ),
        ({"threshold": 0.7}, "minhash", MINHASH, {**MINHASH, "threshold": 0.7}),
        ({"model": "model-b"}, "semantic", SEMANTIC, {**SEMANTIC, "model": "model-b"}),
    ],
    ids=["radius", "threshold", "embedding-model"],
)
def test_an_index_refuses_a_run_with_another_radius_threshold_or_model_with_exit_6(
    seen, tmp_path, change, method, then, now
):
    idx = seen / "idx"
    before = (idx / "_index.json").read_bytes()
    change = dict(change)
    model = change.pop("model", "model-a")
    data = index_input(tmp_path / "day2.parquet", model)
    with pytest.raises(DriftError) as err:
        dedup_run(data, tmp_path / "day2", index=str(idx), **change)
    assert err.value.exit_code == EXIT_DRIFT == 6
    found = re.fullmatch(
        rf"--index {re.escape(str(idx))} was built with other dedup settings \({method}: "
        r"(\{.*\}) then, (\{.*\}) now\); use another directory or the settings it was built with",
        str(err.value),
    )
    assert found, str(err.value)
    assert (ast.literal_eval(found[1]), ast.literal_eval(found[2])) == (then, now)
    assert (idx / "_index.json").read_bytes() == before
    assert not (tmp_path / "day2" / "_manifest.json").exists()


def test_dedup_index_json_describes_the_index_as_info_does(seen):
    idx = seen / "idx"
    described = json.loads(run("dedup-index", idx, "--json").stdout)
    assert described == json.loads(run("info", idx, "--json").stdout)
    files = [p for p in idx.iterdir() if p.name.startswith(("gen-", "model-"))]
    assert (described["index"], described["rows"], described["methods"]) == (
        str(idx),
        6,
        list(INDEX_METHODS),
    )
    params = described["params"]
    assert params["phash"] == {"max_distance": 10, "flip": False}
    assert params["minhash"]["threshold"] == 0.6 and params["semantic"]["model"] == "model-a"
    assert described["bytes"] == sum(p.stat().st_size for p in files) > 0
    assert [(r["output"], r["rows"]) for r in described["runs"]] == [(str(seen / "day1"), 6)]
    assert described["pending"] is None


# -- info and explain ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def piped(tmp_path_factory) -> Path:
    """`ingest | dedup -m phash -o deduped` over 5 photos, a resized copy of one (near.jpg), a
    file that is no image and an empty one."""
    from PIL import Image

    root = tmp_path_factory.mktemp("explain")
    folder = make_image_folder(root / "imgs", 5)
    with Image.open(folder / "img00001.jpg") as im:
        im.resize((96, 64)).save(folder / "near.jpg", quality=60)
    (folder / "near.txt").write_text("the same photo, larger")
    (folder / "bad.jpg").write_bytes(b"not a jpeg at all")
    (folder / "empty.jpg").write_bytes(b"")
    out = root / "deduped"
    mm = shlex.join(MMTOOLS)
    pipe = f"{mm} ingest {folder} -q | {mm} dedup -m phash -o {out} -q"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {pipe}"], capture_output=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    return out


def test_info_shows_schema_size_and_rejects_by_reason(piped):
    lines = run("info", piped).stdout.splitlines()
    shards = sorted(piped.glob("part-*.parquet"))
    size = human_bytes(sum(p.stat().st_size for p in shards))
    assert lines[:2] == ["rows:    5", f"shards:  {len(shards)}  ({size})"]
    assert "rejects: 2 (not_image 1, zero_byte 1)" in lines
    schema = pq.read_schema(shards[0])
    shown = lines[lines.index("schema:") + 1 : lines.index("lineage:")]
    assert [line.split(None, 1) for line in shown] == [[f.name, str(f.type)] for f in schema]


def test_explain_json_gives_one_object_per_id_and_not_found_for_an_unknown_one(piped):
    result = run("explain", piped, "near.jpg", "nope", "--json", code=EXIT_DATA)
    near, nope = map(json.loads, result.stdout.splitlines())
    assert (near["id"], near["fate"], near["steps"][-1]["kept_id"]) == (
        "near.jpg",
        "dropped",
        "img00001.jpg",
    )
    assert nope == {
        "dataset": str(piped),
        "fate": "not_found",
        "id": "nope",
        "output": None,
        "source": None,
        "steps": [],
    }


def test_explain_names_the_phash_distance_in_bits_and_the_ledger_record(piped):
    dropped = read_dropped(str(piped)).to_pylist()
    (row,) = [r for r in dropped if r[C.ID] == "near.jpg"]
    why = (
        "dropped by dedup, rule phash, a duplicate of img00001.jpg, "
        f"pHash distance (bits) {row['value']:g}"
    )
    lines = run("explain", piped, "near.jpg").stdout.splitlines()
    assert lines[0] == f"near.jpg: {why}"
    assert lines[-3] == f"  2. dedup   {why.replace('dropped', 'DROPPED', 1)}  -> {piped}"
    argv = ["mmtools", "dedup", "-m", "phash", "-o", str(piped), "-q"]
    assert lines[-2] == f"     by:     {shlex.join(argv)}"
    assert lines[-1] == f"     record: {piped / '_dropped'}"


# -- rewrite ------------------------------------------------------------------------------


def test_rewrite_reads_the_api_key_from_OPENAI_API_KEY_by_default(tmp_path):
    texts = {"a": "a red circle", "b": "two blue squares"}
    pq.write_table(pa.table({C.ID: list(texts), C.TEXT: list(texts.values())}),
                   tmp_path / "in.parquet")  # fmt: skip
    with LLMServer(api_key="sk-from-the-default-variable") as server:
        mmtools("rewrite", tmp_path / "in.parquet", "--base-url", server.url, "--model", "tiny",
                "-o", tmp_path / "out", "-q",
                env={"OPENAI_API_KEY": "sk-from-the-default-variable"})  # fmt: skip
    assert set(server.auth) == {"Bearer sk-from-the-default-variable"}
    assert read_dataset(tmp_path / "out")[C.TEXT_SYNTHETIC].to_pylist() == [
        f"{t} (rewritten)" for t in texts.values()
    ]


# -- index --------------------------------------------------------------------------------


def embeddings(path: Path, rows: int = 4, dim: int = 512) -> Path:
    """`rows` float16 image embeddings of `dim` dimensions, with the model behind them."""
    x = np.random.default_rng(1).standard_normal((rows, dim)).astype(np.float16)
    table = pa.table(
        {
            C.ID: [f"r{i}" for i in range(rows)],
            C.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
        }
    )
    info = {C.IMAGE_EMBEDDING: {"model": "ViT-B-32", "pretrained": "openai", "dim": dim}}
    pq.write_table(
        table.replace_schema_metadata(C.with_metadata(table.schema, info).metadata), path
    )
    return path


def test_index_defaults_exact_below_100000_max_memory_4gb_and_parts_sized_by_the_memory(
    tmp_path,
):
    run("index", embeddings(tmp_path / "emb.parquet"), "-o", tmp_path / "idx", "-q")
    made = json.loads((tmp_path / "idx" / "_index.json").read_text())
    params = made["fingerprint"]["params"]
    assert (params["exact_below"], params["max_memory"], params["part_rows"]) == (
        100_000,
        4 * 2**30,
        None,
    )
    # Parts of (4 GiB less the 400 MiB the process itself takes) / 8 / (12 bytes a dimension).
    assert (made["plan"]["kind"], made["plan"]["part_rows"]) == ("flat", 78_848)
    assert (4 * 2**30 - 400 * 2**20) // 8 // (512 * 12) == 78_848


def test_too_little_memory_for_an_index_is_one_line_saying_how_much_is_needed(tmp_path):
    from mmtools.tools.index.plan import choose

    data = embeddings(tmp_path / "emb.parquet")
    proc = mmtools("index", data, "-o", tmp_path / "idx", "--max-memory", "401MB", check=False)
    assert proc.returncode == EXIT_USAGE
    (line,) = proc.stderr.decode().splitlines()
    found = re.fullmatch(
        r"mmtools index: error: --max-memory 401\.0 MiB is too small for 4 vectors of 512 "
        r"dimensions; give at least (\d+\.\d) MiB",
        line,
    )
    assert found, line
    needed = float(found[1]) * 2**20  # rounded up to the 0.1 MiB it is printed with
    choose(4, 512, int(needed), 100_000)
    with pytest.raises(UsageError, match="too small"):
        choose(4, 512, int(needed - 0.1 * 2**20), 100_000)


# -- media ----------------------------------------------------------------------------------


def test_an_image_may_take_60_s_to_decode_unless_MMTOOLS_DECODE_TIMEOUT_says_otherwise(
    monkeypatch,
):
    import threading
    import time

    from mmtools import media

    assert (media.ENV_DECODE_TIMEOUT, media.DEFAULT_DECODE_TIMEOUT) == (
        "MMTOOLS_DECODE_TIMEOUT",
        60.0,
    )
    # With the variable unset, the limit the decoding is held to is that default: made 50 ms
    # here, a decode that never ends is given up after it.
    monkeypatch.delenv(media.ENV_DECODE_TIMEOUT, raising=False)
    monkeypatch.setattr(media, "DEFAULT_DECODE_TIMEOUT", 0.05)
    stuck = threading.Event()
    try:
        with pytest.raises(media.MediaError) as err:
            media.within_time_limit(stuck.wait)
    finally:
        stuck.set()
    assert (err.value.reason, err.value.detail) == (
        "decode_timeout",
        "decoding took more than 0.05 s",
    )
    monkeypatch.setenv(media.ENV_DECODE_TIMEOUT, "30")  # the variable, when set, wins
    assert media.within_time_limit(lambda: time.sleep(0.2) or "decoded") == "decoded"


# -- demo and the bundled model -------------------------------------------------------------


def test_the_default_demo_sample_is_666_files_with_60_labelled_rows_12_of_them_blurred(tmp_path):
    from mmtools.demo.chain import DemoConfig, make_sample

    defaults = parse("mmtools demo demo-out/")
    truth = make_sample(tmp_path / "s", DemoConfig(rows=defaults["rows"], seed=defaults["seed"]))
    assert len(list((tmp_path / "s").glob("*.jpg"))) == 666
    assert len(truth.corrupt) == 6 and len(truth.blurred) == 120
    assert (len(truth.labelled), len(set(truth.labelled) & set(truth.blurred))) == (60, 12)


def test_the_readme_figures_of_the_bundled_model_are_its_file_and_its_training_record():
    from mmtools.models import shapes

    size = shapes.weights_path().stat().st_size
    assert f"`mmtools-shapes` ({size / 1e6:.1f} MB)" in PROSE
    metrics = shapes.training_record()["metrics"]
    own, variant = metrics["auc_matched_vs_shuffled"], metrics["variant_auc_matched_vs_shuffled"]
    assert (
        f"ROC AUC {own:.4f} on held-out pairs of its own domain and {variant:.3f} on a held-out "
        "generator variant"
    ) in PROSE


# -- recipes --------------------------------------------------------------------------------

RECIPES = sorted((ROOT / "recipes").glob("*.sh"))


def header(recipe: Path) -> list[str]:
    """The comment lines after the shebang, their `#` taken off."""
    lines = recipe.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    out = []
    for line in lines[1:]:
        if not line.startswith("#"):
            break
        out.append(line[1:].strip())
    return out


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_each_recipe_header_says_what_it_reproduces_and_where_its_thresholds_come_from(recipe):
    lines = header(recipe)
    summary, blank = lines[0], lines[1]
    assert summary.endswith(".") and blank == "", lines[:2]
    # The paragraph after the summary: what it reproduces or follows, and why these values.
    about = " ".join(lines[2 : lines.index("", 2)])
    assert len(about.split()) >= 25, about
    assert any(line.startswith(f"Usage: recipes/{recipe.name} ") for line in lines)
    # Every number the script takes from its environment (a threshold, a fraction, a count)
    # is named in the header with its default: NAME ... (default VALUE or NAME (VALUE).
    body = recipe.read_text().split("\n", len(lines) + 1)[-1]
    defaults = re.findall(r"\$\{([A-Z_]+):?-([0-9.]+)\}", body)
    for name, value in defaults:
        stated = rf"\b{name}\b[^()]*\((default:? )?{re.escape(value)}(?![\d.])"
        assert any(re.search(stated, line) for line in lines), (recipe.name, name, value)
    assert defaults or recipe.name in ("laion_threshold.sh", "cron_incremental.sh")


# -- Justfile and benchmarks ------------------------------------------------------------------

JUST = Path(sys.executable).parent / "just"


def test_just_bench_runs_every_bench_quick_and_names_the_one_that_missed_lint_and_soak(tmp_path):
    """PYTHON (the Justfile's interpreter) is a script recording its arguments, that fails as
    a benchmark missing its target would for bench_light.py."""
    log = tmp_path / "calls"
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'echo "MMTOOLS_SOAK=${MMTOOLS_SOAK:-} $*" >> "$CALLS"\n'
        'case "$1" in *bench_light.py) exit 1;; esac\n'
    )
    python.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(python), "CALLS": str(log)}

    def just(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([JUST, *args], cwd=ROOT, env=env, capture_output=True, timeout=60)

    bench = just("bench", "--quick")
    assert bench.returncode == 1
    assert (
        "bench: a target missed or the script failed in: tests/bench/bench_light.py"
    ) in bench.stderr.decode().splitlines()
    scripts = sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "tests/bench").glob("bench_*.py")
    )
    assert sorted(log.read_text().splitlines()) == [f"MMTOOLS_SOAK= {s} --quick" for s in scripts]
    log.unlink()
    assert just("lint").returncode == 0 and just("soak").returncode == 0
    assert log.read_text().splitlines() == [
        "MMTOOLS_SOAK= -m ruff check mmtools tests",
        "MMTOOLS_SOAK= -m ruff format --check mmtools tests",
        "MMTOOLS_SOAK=200 -m pytest -q tests/reliability",
    ]


HELP_OF_EACH = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, "tests/bench")
for path in sys.argv[1:]:
    sys.argv, out, code = [path, "--help"], io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code
    print(json.dumps([path, code, out.getvalue()]))
"""


def test_every_bench_script_takes_quick():
    """Each script's --help, all in one process (their imports are shared)."""
    scripts = sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "tests/bench").glob("bench_*.py")
    )
    proc = subprocess.run([sys.executable, "-c", HELP_OF_EACH, *scripts], cwd=ROOT,
                          capture_output=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    helps = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [path for path, _, _ in helps] == scripts
    for path, code, text in helps:
        usage = text.split("\n\n", 1)[0]
        assert code == 0 and "[--quick]" in usage, (path, text)


def test_a_demo_too_small_to_label_ten_blurred_rows_is_refused_before_it_starts(tmp_path):
    """Below 500 rows the sample holds fewer than 10 labelled blurred rows, which train-head
    refuses after the chain has run for half a minute: the option says so at once."""
    from mmtools.demo.chain import DemoConfig, make_sample

    proc = mmtools("demo", tmp_path / "d", "--rows", "499", check=False)
    assert proc.returncode == 2 and "greater than or equal to 500" in proc.stderr.decode()
    assert not (tmp_path / "d").exists()
    truth = make_sample(tmp_path / "s", DemoConfig(rows=500))
    assert len(set(truth.labelled) & set(truth.blurred)) >= 10
