"""`mmtools score --head`: LAION's published heads give what torch gives; mismatches refused."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import mmtools, read_dataset, reject_reasons
from torch import nn

from mmtools import columns as C
from mmtools.models import heads as H

L14 = {"model": "ViT-L-14", "pretrained": "openai", "dim": 768, "normalized": True}


class AestheticMLP(nn.Module):
    """LAION's improved aesthetic predictor, as published (Dropout between Linears)."""

    def __init__(self, relu: bool = False):
        super().__init__()
        act = [nn.ReLU()] if relu else []
        self.layers = nn.Sequential(
            nn.Linear(768, 1024), *act, nn.Dropout(0.2),
            nn.Linear(1024, 128), *act, nn.Dropout(0.2),
            nn.Linear(128, 64), *act, nn.Dropout(0.1),
            nn.Linear(64, 16), *act,
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x):
        return self.layers(x)


class KerasNSFW(nn.Module):
    """LAION's CLIP NSFW detector as ported from Keras (ViT-L/14 layout)."""

    def __init__(self, sizes=(768, 64, 512, 256, 1)):
        super().__init__()
        self.norm = nn.Module()
        self.norm.register_buffer("mean", torch.randn(sizes[0]) * 0.02)
        self.norm.register_buffer("variance", torch.rand(sizes[0]) * 0.01 + 1e-3)
        for i in range(1, len(sizes)):
            setattr(self, f"linear_{i}", nn.Linear(sizes[i - 1], sizes[i]))
        self.n = len(sizes) - 1

    def forward(self, x):
        x = (x - self.norm.mean) / (self.norm.variance.sqrt() + 1e-10)
        for i in range(1, self.n):
            x = torch.relu(getattr(self, f"linear_{i}")(x))
        return torch.sigmoid(getattr(self, f"linear_{self.n}")(x))


class H14NSFW(nn.Module):
    """LAION's H/14 NSFW head (ReLU and Dropout after the first five Linears)."""

    def __init__(self):
        super().__init__()
        sizes, mods = [1024, 1024, 2048, 1024, 256, 128], []
        for a, b in itertools.pairwise(sizes):
            mods += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.2)]
        self.layers = nn.Sequential(*mods, nn.Linear(128, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def _save(module: nn.Module, path) -> nn.Module:
    torch.save(module.state_dict(), path)
    return module.eval()


def embeddings_file(path, dim: int, rows: int, info: dict, seed: int = 0) -> np.ndarray:
    """Random float16 embeddings (not unit) with a null, a NaN and a zero row at the end;
    returned with those three rows as zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, dim)) * rng.uniform(0.5, 3, (rows, 1))).astype(np.float16)
    x[-2] = np.nan
    x[-1] = 0
    values = pa.array(x.reshape(-1))
    emb = pa.FixedSizeListArray.from_arrays(
        values, type=C.embedding_type(dim), mask=pa.array([i == rows - 3 for i in range(rows)])
    )
    table = pa.table({C.ID: [f"r{i:03d}" for i in range(rows)], C.IMAGE_EMBEDDING: emb})
    schema = C.with_metadata(table.schema, {C.IMAGE_EMBEDDING: info})
    pq.write_table(table.cast(schema), path)
    x[-3:] = 0
    return x


def direct(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """The head's output by plain torch on the L2-normalised float32 embeddings, for the rows
    but the three bad ones at the end. All rows go through at once, as they do in one
    mmtools batch: a BLAS result may differ in the last bit with the number of rows."""
    with torch.no_grad():
        t = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)
        return module(t)[:-3, 0].numpy()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Random heads in each published layout, and 768-d ViT-L/14 embeddings."""
    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    mods = {
        "aesthetic": _save(AestheticMLP(), root / "sac+logos+ava1-l14-linearMSE.pth"),
        "aesthetic_relu": _save(AestheticMLP(relu=True), root / "ava+logos-l14-reluMSE.pth"),
        "linear": _save(nn.Linear(768, 1), root / "sa_0_4_vit_l_14_linear.pth"),
        "punsafe": _save(KerasNSFW(), root / "clip_ViT-L-14_openai_binary_nsfw_head.pth"),
    }
    files = {
        "aesthetic": "sac+logos+ava1-l14-linearMSE.pth",
        "aesthetic_relu": "ava+logos-l14-reluMSE.pth",
        "linear": "sa_0_4_vit_l_14_linear.pth",
        "punsafe": "clip_ViT-L-14_openai_binary_nsfw_head.pth",
    }
    x = embeddings_file(root / "l14.parquet", 768, 203, L14)
    return root, mods, {k: root / v for k, v in files.items()}, x


def test_published_heads_give_exactly_what_torch_gives(published):
    root, mods, files, x = published
    args = [a for name, path in files.items() for a in ("--head", f"{name}={path}")]
    mmtools("score", root / "l14.parquet", *args, "-o", root / "out", "-q")
    out = read_dataset(root / "out")
    assert out.column(C.ID).to_pylist() == [f"r{i:03d}" for i in range(200)]
    assert C.CLIP_SCORE not in out.column_names  # no text in the input
    for name, module in mods.items():
        assert out.schema.field(name).type == pa.float32()
        np.testing.assert_array_equal(out.column(name).to_numpy(), direct(module, x), name)
    assert reject_reasons(root / "out") == {
        "r200": "no_embedding",
        "r201": "bad_embedding",
        "r202": "bad_embedding",
    }
    info = C.column_info(out.schema)
    assert info["aesthetic"]["head"] == "laion-aesthetic-mlp"
    assert info["punsafe"]["head"] == "laion-nsfw"
    assert info["linear"]["file"] == str(files["linear"])
    assert (info["linear"]["model"], info["linear"]["of"]) == ("ViT-L-14", [C.IMAGE_EMBEDDING])


def test_each_published_layout_is_recognised_with_its_model(published):
    _, _, files, _ = published
    got = {
        k: (h.format, h.model, h.pretrained, h.output, [la.activation for la in h.layers])
        for k, h in ((k, H.load(str(p))) for k, p in files.items())
    }
    assert got == {
        "aesthetic": ("laion-aesthetic-mlp", "ViT-L-14", "openai", "identity", ["none"] * 5),
        "aesthetic_relu": (
            "laion-aesthetic-mlp-relu",
            "ViT-L-14",
            "openai",
            "identity",
            ["relu"] * 4 + ["none"],
        ),
        "linear": ("laion-aesthetic-linear", "ViT-L-14", "openai", "identity", ["none"]),
        "punsafe": ("laion-nsfw", "ViT-L-14", "openai", "sigmoid", ["relu"] * 3 + ["none"]),
    }


def test_h14_nsfw_head_on_vit_h_embeddings(tmp_path):
    torch.manual_seed(1)
    module = _save(H14NSFW(), tmp_path / "h14_nsfw.pth")
    info = {"model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k", "dim": 1024}
    x = embeddings_file(tmp_path / "h14.parquet", 1024, 53, info, seed=2)
    mmtools(
        "score",
        tmp_path / "h14.parquet",
        "--head",
        f"punsafe={tmp_path / 'h14_nsfw.pth'}",
        "-o",
        tmp_path / "out",
        "-q",
    )
    got = read_dataset(tmp_path / "out").column("punsafe").to_numpy()
    np.testing.assert_array_equal(got, direct(module, x))
    assert H.load(str(tmp_path / "h14_nsfw.pth")).format == "laion-nsfw-h14"


def _one_line_error(proc) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_head_for_another_model_is_refused_unless_forced(published, tmp_path):
    _root, mods, files, _ = published
    other = {**L14, "pretrained": "laion2b_s32b_b82k"}
    x = embeddings_file(tmp_path / "laion.parquet", 768, 23, other, seed=5)
    args = ["score", tmp_path / "laion.parquet", "--head", f"aesthetic={files['aesthetic']}"]
    proc = mmtools(*args, "-o", tmp_path / "no", check=False)
    assert proc.returncode == 3
    assert _one_line_error(proc) == (
        "mmtools score: error: head aesthetic expects 768-d ViT-L-14 (openai) embeddings but "
        "image_embedding was made by ViT-L-14 (laion2b_s32b_b82k); embed with that model, or "
        "pass --force if they are the same weights"
    )
    assert not (tmp_path / "no").exists()
    mmtools(*args, "--force", "-o", tmp_path / "yes", "-q")
    got = read_dataset(tmp_path / "yes").column("aesthetic").to_numpy()
    np.testing.assert_array_equal(got, direct(mods["aesthetic"], x))


def test_head_of_another_size_is_refused_even_forced(published, tmp_path):
    root, _, _, _ = published
    torch.manual_seed(3)
    _save(nn.Linear(512, 1), tmp_path / "sa_0_4_vit_b_32_linear.pth")
    for force in ([], ["--force"]):
        proc = mmtools(
            "score",
            root / "l14.parquet",
            "--head",
            f"a={tmp_path / 'sa_0_4_vit_b_32_linear.pth'}",
            *force,
            "-o",
            tmp_path / "out",
            check=False,
        )
        assert proc.returncode == 3
        assert (
            _one_line_error(proc).startswith("mmtools score: error: head a (")
            and "takes 512-d ViT-B-32 (openai) embeddings but image_embedding has 768 dimensions"
            in proc.stderr.decode()
        )


def test_mmtools_head_format_round_trips_and_records_its_model(tmp_path):
    rng = np.random.default_rng(4)
    layers = [
        H.Layer(
            rng.standard_normal((8, 6)).astype(np.float32),
            rng.standard_normal(8).astype(np.float32),
            "relu",
        ),
        H.Layer(
            rng.standard_normal((1, 8)).astype(np.float32),
            rng.standard_normal(1).astype(np.float32),
        ),
    ]
    head = H.Head(
        H.FORMAT,
        layers,
        "sigmoid",
        model="mmtools-shapes",
        pretrained="bundled",
        input=C.TEXT_EMBEDDING,
        label="good",
    )
    weights, _sidecar = H.save(head, str(tmp_path / "good.safetensors"))
    spec = json.loads((tmp_path / "good.json").read_text())
    assert (spec["layers"], spec["activation"], spec["output"], spec["input"], spec["model"]) == (
        2,
        "relu",
        "sigmoid",
        C.TEXT_EMBEDDING,
        "mmtools-shapes",
    )
    (tmp_path / "good.json").unlink()  # the copy in the safetensors header is enough
    back = H.load(weights)
    x = torch.from_numpy(rng.standard_normal((5, 6)).astype(np.float32))
    want = torch.sigmoid(
        torch.relu(x @ torch.from_numpy(layers[0].weight).T + torch.from_numpy(layers[0].bias))
        @ torch.from_numpy(layers[1].weight).T
        + torch.from_numpy(layers[1].bias)
    )
    assert torch.equal(back.build("cpu")(x), want[:, 0])
    assert (back.input, back.label, back.model, back.pretrained) == (
        C.TEXT_EMBEDDING,
        "good",
        "mmtools-shapes",
        "bundled",
    )


def test_bad_head_files_and_names_are_usage_errors(published, tmp_path):
    root, _, files, _ = published
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "odd.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    cases = {
        f"x={tmp_path / 'odd.pth'}": "is not a head layout mmtools reads",
        f"x={tmp_path / 'text.pth'}": "cannot read head",
        f"x={tmp_path / 'missing.pth'}": "does not exist",
        str(files["linear"]): "--head takes NAME=PATH",
        f"clip_score={files['linear']}": "clip_score is a column mmtools owns",
        f"2x={files['linear']}": "must be letters, digits and _",
    }
    for spec, message in cases.items():
        proc = mmtools(
            "score", root / "l14.parquet", "--head", spec, "-o", tmp_path / "o", check=False
        )
        assert proc.returncode == 2, (spec, proc.stderr)
        assert message in _one_line_error(proc), (spec, proc.stderr)
