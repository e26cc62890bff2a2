# Tasks for mmtools. `just --list` shows them.

python := env_var_or_default("PYTHON", ".venv/bin/python")

# Create .venv and install mmtools with everything the tests need.
setup:
    python3 -m venv .venv
    .venv/bin/pip install -e '.[test]'

# The whole chain on generated sample data, offline.
demo dir="demo-out":
    #!/usr/bin/env bash
    set -euo pipefail
    if {{python}} -c "import sys; from mmtools.models.shapes import weights_path; sys.exit(not weights_path().exists())"; then
        {{python}} -m mmtools demo {{dir}} --overwrite
    else
        echo "demo: the bundled mmtools-shapes weights are not built (python -m mmtools.demo.train); running ingest + info on the generated sample only" >&2
        rm -rf {{dir}} && mkdir -p {{dir}}
        {{python}} -c "from pathlib import Path; from mmtools.demo.chain import DemoConfig, make_sample; make_sample(Path('{{dir}}/sample/images'), DemoConfig())"
        {{python}} -m mmtools ingest {{dir}}/sample/images -o {{dir}}/ds
        {{python}} -m mmtools info {{dir}}/ds
    fi

# The test suite (what CI runs): two worker processes, each test file on one of them.
test *args:
    {{python}} -m pytest -q -n 2 --dist loadfile {{args}}

# Benchmarks: throughput and memory as ratios against baselines measured in the same run.
# Every script runs; the task fails at the end, naming the scripts that missed a target.
bench *args:
    #!/usr/bin/env bash
    failed=()
    for b in tests/bench/bench_*.py; do
        echo "== $b"
        {{python}} "$b" {{args}} || failed+=("$b")
    done
    if (( ${#failed[@]} )); then
        echo "bench: a target missed or the script failed in: ${failed[*]}" >&2
        exit 1
    fi

# Mutation testing of the core modules (step contract, accounting, top fraction, dedup,
# stats, dataset I/O) with their fast tests; slow, outside CI. Prints the score at the end.
mutate *args:
    {{python}} -m pip install -q 'mutmut>=3.3'
    {{python}} -m mutmut run {{args}} || true
    {{python}} -m mutmut export-cicd-stats
    {{python}} -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); n = s['killed'] + s['survived'] + s.get('timeout', 0) + s.get('suspicious', 0); print(f\"mutants killed: {s['killed']}/{n} ({s['killed'] / max(n, 1):.0%}); survivors: mutmut results\")"

# GPU readiness of embed: ViT-B-32 and ViT-L-14, fp16 and bf16, 20k images (a tiny model on CPU).
bench-gpu *args:
    {{python}} tests/bench/bench_gpu.py {{args}}

# Long crash/resume soak (200 kills per step kind).
soak:
    MMTOOLS_SOAK=200 {{python}} -m pytest -q tests/reliability

# Lint and format check.
lint:
    {{python}} -m ruff check mmtools tests
    {{python}} -m ruff format --check mmtools tests
