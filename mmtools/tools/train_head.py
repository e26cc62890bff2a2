"""Train a head (a probe) on labelled rows of a dataset: `mmtools train-head`.

Reads the label and embedding columns of the whole input (rows with a null label are
ignored), L2-normalises the embeddings as `score --head` does, standardises them, and fits:

- `logistic` (0/1 labels): L2-regularised logistic regression by Newton's method;
- `linear`: ridge regression, closed form (the default for float labels);
- `mlp`: one hidden ReLU layer, Adam, seeded minibatches; sigmoid output for 0/1 labels.

Quality is the k-fold (stratified for 0/1 labels) out-of-fold AUC with the Hanley–McNeil
95% interval, or R² with a seeded bootstrap interval for float labels. The final head is
fitted on every labelled row, the standardisation folded into its first layer, and written
in the mmtools head format. Everything is float64 numpy but the MLP (float32 torch on the
CPU, seeded), so the same input and seed give the same head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.models import heads as H

KINDS = ("logistic", "linear", "mlp")
BOOTSTRAP = 1000
L2_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)
NEWTON_STEPS = 50
MLP_STEPS = 400
MLP_BATCH = 512
SMALL_STEP = 10_000_000  # multiply-adds of one MLP step below which it runs on one thread


@dataclass
class TrainConfig:
    """What to learn from which columns, and how."""

    label: str
    embedding: str = C.IMAGE_EMBEDDING
    kind: str | None = None  # None: logistic for 0/1 labels, linear for other numbers
    folds: int = 5
    seed: int = 0
    # Penalty on the summed loss (sklearn's 1/C) on standardised inputs; None: the value of
    # L2_GRID with the least out-of-fold loss (logistic, linear), 1.0 for the MLP.
    l2: float | None = None
    hidden: int = 256
    min_per_class: int = 10


@dataclass
class TrainReport:
    """How many rows taught what, and how well the head predicts rows it did not see."""

    label: str
    embedding: str
    kind: str
    task: str  # classification or regression
    labelled: int
    unlabelled: int
    bad_embeddings: int
    positives: int | None
    metric: str  # auc or r2
    value: float
    low: float
    high: float
    folds: int
    model: str | None = None
    fold_values: list[float] = field(default_factory=list)
    l2: float | None = None

    def line(self) -> str:
        """One line for people: balance, then the cross-validated quality."""
        if self.task == "classification":
            pos, neg = self.positives, self.labelled - self.positives
            balance = f"{pos} positive ({pos / self.labelled:.1%}), {neg} negative"
        else:
            balance = f"{self.labelled} labelled"
        skipped = f", {self.unlabelled} unlabelled ignored" if self.unlabelled else ""
        if self.bad_embeddings:
            skipped += f", {self.bad_embeddings} without a usable embedding"
        name = "AUC" if self.metric == "auc" else "R²"
        return (
            f"{balance}{skipped}; {self.kind} on {self.embedding}"
            + (f" ({self.model})" if self.model else "")
            + (f", l2 {self.l2:g}" if self.l2 is not None and self.kind != "mlp" else "")
            + f": {self.folds}-fold {name} {self.value:.3f} "
            f"(95% CI {self.low:.3f}-{self.high:.3f})"
        )


def read_labelled(source, config: TrainConfig, progress=None):
    """(unit embeddings float64, labels float64, counts) of the labelled rows of `source`."""
    schema = source.schema
    C.require(schema, [config.label, config.embedding], "train-head")
    kind = schema.field(config.label).type
    if not (pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise DataContractError(
            f"label column {config.label} is {kind}; train-head takes boolean, 0/1 or float labels"
        )
    t = schema.field(config.embedding).type
    if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
        raise DataContractError(f"{config.embedding} is {t}, not a fixed-size list of floats")
    xs, ys, unlabelled, bad = [], [], 0, 0
    for batch in source.batches(columns=[config.label, config.embedding], batch_size=65536):
        y = pc.cast(batch.column(config.label), pa.float64()).to_numpy(zero_copy_only=False)
        emb = batch.column(config.embedding)
        dim = t.list_size
        flat = emb.values.slice(emb.offset * dim, len(emb) * dim)
        x = flat.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(emb), dim)
        norm = np.linalg.norm(x, axis=1)
        labelled = np.isfinite(y)
        usable = np.isfinite(norm) & (norm > 0) & ~np.asarray(emb.is_null())
        unlabelled += int((~labelled).sum())
        bad += int((labelled & ~usable).sum())
        keep = labelled & usable
        xs.append(x[keep] / norm[keep, None])
        ys.append(y[keep])
        if progress is not None:
            progress(batch.num_rows)
    x = np.concatenate(xs) if xs else np.zeros((0, t.list_size))
    y = np.concatenate(ys) if ys else np.zeros(0)
    return x, y, {"unlabelled": unlabelled, "bad_embeddings": bad}


def choose(y: np.ndarray, config: TrainConfig) -> tuple[str, str]:
    """(task, kind): classification when every label is 0 or 1; refuse too few rows."""
    binary = bool(len(y)) and bool(np.isin(y, (0.0, 1.0)).all())
    kind = config.kind or ("logistic" if binary else "linear")
    if kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "logistic" and not binary:
        raise UsageError(
            f"--kind logistic needs 0/1 labels, but {config.label} has other values; "
            "use --kind linear or mlp"
        )
    least = max(config.min_per_class, config.folds)
    if binary:
        pos = int(y.sum())
        if min(pos, len(y) - pos) < least:
            raise DataContractError(
                f"{config.label}: {pos} rows are labelled 1 and {len(y) - pos} labelled 0; "
                f"label at least {least} of each to train and cross-validate a head"
            )
    elif len(y) < 2 * least:
        raise DataContractError(
            f"{config.label}: only {len(y)} labelled rows; label at least {2 * least}"
        )
    return ("classification" if binary else "regression"), kind


def train(x: np.ndarray, y: np.ndarray, kind: str, task: str, config: TrainConfig) -> list:
    """Fit on standardised `x`; return the layers [(weight, bias, activation)] on raw `x`."""
    mu, sigma = x.mean(axis=0), x.std(axis=0)
    sigma = np.where(sigma > 1e-12, sigma, 1.0)
    z = (x - mu) / sigma
    if kind == "logistic":
        layers = [_logistic(z, y, config.l2)]
    elif kind == "linear":
        layers = [_ridge(z, y, config.l2)]
    else:
        layers = _mlp(z, y, task, config)
    w, b, act = layers[0]
    layers[0] = (w / sigma[None, :], b - w @ (mu / sigma), act)  # standardisation folded in
    return layers


def _logistic(z: np.ndarray, y: np.ndarray, l2: float) -> tuple:
    """Newton's method on the summed log loss + l2/2 |w|² (the bias not penalised)."""
    n, d = z.shape
    a = np.hstack([z, np.ones((n, 1))])
    w = np.zeros(d + 1)
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    for _ in range(NEWTON_STEPS):
        p = _sigmoid(a @ w)
        grad = a.T @ (p - y) + penalty * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[None, :d], w[d:], "none"


def _ridge(z: np.ndarray, y: np.ndarray, l2: float) -> tuple:
    d = z.shape[1]
    mean = y.mean()
    w = np.linalg.solve(z.T @ z + l2 * np.eye(d), z.T @ (y - mean))
    return w[None, :], np.array([mean]), "none"


def _mlp(z: np.ndarray, y: np.ndarray, task: str, config: TrainConfig) -> list:
    """One hidden ReLU layer; Adam on seeded minibatches; weight decay from --l2."""
    import torch

    threads = torch.get_num_threads()
    if min(len(z), MLP_BATCH) * z.shape[1] * config.hidden < SMALL_STEP:
        torch.set_num_threads(1)  # threads cost more than they save on a small step
    try:
        return _adam(z, y, task, config)
    finally:
        torch.set_num_threads(threads)


def _adam(z: np.ndarray, y: np.ndarray, task: str, config: TrainConfig) -> list:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(z.shape[1], config.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(config.hidden, 1),
        ).double()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=config.l2 * 1e-2)
        xs, ys = torch.from_numpy(z), torch.from_numpy(y)[:, None]
        loss_fn = (
            torch.nn.functional.binary_cross_entropy_with_logits
            if task == "classification"
            else torch.nn.functional.mse_loss
        )
        rng = np.random.default_rng(config.seed)
        order, at = rng.permutation(len(z)), 0
        for _ in range(MLP_STEPS):
            if at >= len(order):
                order, at = rng.permutation(len(z)), 0
            idx = torch.from_numpy(order[at : at + MLP_BATCH])
            at += MLP_BATCH
            opt.zero_grad()
            loss_fn(net(xs[idx]), ys[idx]).backward()
            opt.step()
    first, last = net[0], net[2]
    return [
        (first.weight.detach().numpy(), first.bias.detach().numpy(), "relu"),
        (last.weight.detach().numpy(), last.bias.detach().numpy(), "none"),
    ]


def predict(layers: list, x: np.ndarray) -> np.ndarray:
    """The head's raw output (before any sigmoid) for rows `x`."""
    for w, b, act in layers:
        x = x @ w.T + b
        if act == "relu":
            x = np.maximum(x, 0.0)
    return x[:, 0]


def folds_of(y: np.ndarray, k: int, seed: int, stratify: bool) -> np.ndarray:
    """A fold number per row: seeded, and per class when `stratify`."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    groups = [np.flatnonzero(y == v) for v in (0.0, 1.0)] if stratify else [np.arange(len(y))]
    for rows in groups:
        fold[rng.permutation(rows)] = np.arange(len(rows)) % k
    return fold


def cross_validate(
    x, y, kind: str, task: str, config: TrainConfig
) -> tuple[float, float, float, list]:
    """Out-of-fold quality: (value, low, high, per-fold values)."""
    fold = folds_of(y, config.folds, config.seed, task == "classification")
    pred = np.empty(len(y))
    per_fold = []
    for k in range(config.folds):
        test = fold == k
        layers = train(x[~test], y[~test], kind, task, config)
        pred[test] = predict(layers, x[test])
        per_fold.append(_metric(pred[test], y[test], task))
    if task == "classification":
        value = auc(pred, y)
        low, high = hanley_mcneil(value, int(y.sum()), int(len(y) - y.sum()))
    else:
        value = r2(pred, y)
        low, high = _bootstrap_r2(pred, y, config.seed)
    return value, low, high, per_fold


def choose_l2(x, y, kind: str, task: str, config: TrainConfig) -> float:
    """The penalty of L2_GRID whose out-of-fold predictions have the least loss (log loss
    for classification, squared error for regression); 1.0 for the MLP. Few labels in many
    dimensions want a strong penalty, many labels a weak one."""
    if kind == "mlp":
        return 1.0
    fold = folds_of(y, config.folds, config.seed + 1, task == "classification")
    losses = []
    for l2 in L2_GRID:
        pred = np.empty(len(y))
        for k in range(config.folds):
            test = fold == k
            pred[test] = predict(
                train(x[~test], y[~test], kind, task, replace(config, l2=l2)), x[test]
            )
        if kind == "logistic":
            p = np.clip(_sigmoid(pred), 1e-12, 1 - 1e-12)
            losses.append(float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()))
        else:
            losses.append(float(((pred - y) ** 2).mean()))
    return L2_GRID[int(np.argmin(losses))]


def _metric(pred: np.ndarray, y: np.ndarray, task: str) -> float:
    if task == "classification":
        return auc(pred, y) if 0 < y.sum() < len(y) else float("nan")
    return r2(pred, y)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(a positive outscores a negative), ties counting half."""
    order = np.argsort(scores, kind="mergesort")
    _, inverse, counts = np.unique(scores[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = np.empty(len(scores))
    ranks[order] = ((ends - counts + 1 + ends) / 2)[inverse]  # average rank of tied values
    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def hanley_mcneil(a: float, n1: int, n0: int) -> tuple[float, float]:
    """95% interval of an AUC from its standard error (Hanley and McNeil, 1982)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0)
    half = 1.959964 * math.sqrt(max(var, 0.0))
    return max(0.0, a - half), min(1.0, a + half)


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    """Coefficient of determination of `pred` for `y`."""
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else float("nan")


def _bootstrap_r2(pred: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, len(y), len(y))
        values.append(r2(pred[idx], y[idx]))
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return float(low), float(high)


def fit(source, config: TrainConfig, progress=None) -> tuple[H.Head, TrainReport]:
    """Cross-validate, then fit on every labelled row: the head and its report."""
    if config.folds < 2:
        raise UsageError("--folds must be at least 2")
    x, y, counts = read_labelled(source, config, progress)
    task, kind = choose(y, config)
    if config.l2 is None:
        config = replace(config, l2=choose_l2(x, y, kind, task, config))
    value, low, high, per_fold = cross_validate(x, y, kind, task, config)
    info = C.column_info(source.schema).get(config.embedding) or {}
    report = TrainReport(
        config.label,
        config.embedding,
        kind,
        task,
        len(y),
        counts["unlabelled"],
        counts["bad_embeddings"],
        int(y.sum()) if task == "classification" else None,
        "auc" if task == "classification" else "r2",
        value,
        low,
        high,
        config.folds,
        info.get("model"),
        per_fold,
        config.l2,
    )
    layers = [
        H.Layer(w.astype(np.float32), b.astype(np.float32), act)
        for w, b, act in train(x, y, kind, task, config)
    ]
    head = H.Head(
        H.FORMAT,
        layers,
        "sigmoid" if task == "classification" and kind != "linear" else "identity",
        model=info.get("model"),
        pretrained=info.get("pretrained"),
        input=config.embedding,
        label=config.label,
        extra={"training": {"config": asdict(config), **asdict(report)}},
    )
    return head, report


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * v))  # no overflow for large |v|
