"""Semantic dedup at its edges, in process: the index model's refit rule at its boundaries,
stored clusters from the model file, pairs with the first index row read, clusters past int16,
similarities of run rows to index rows, the Ray path's sample and buckets, exact helpers."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from mmtools import columns as C
from mmtools.step import BUCKET, POSITION
from mmtools.steps.dedup.index import GEN, Model
from mmtools.steps.dedup.semantic import (
    CLUSTER,
    ERROR,
    INDEX_CLUSTER,
    INDEX_SCALE,
    INDEX_UNIT,
    KMeans,
    Semantic,
    _share,
    duplicate_labels,
    fitted,
    problems,
    quantised,
    sampled,
    unit_rows,
)

COL = C.IMAGE_EMBEDDING
DIM = 16
EPS = 0.05


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, in float64."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


def embeddings(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float32).ravel()), DIM)


def near_axes(rng: np.random.Generator, axes: list[int]) -> np.ndarray:
    """A row near basis vector e_c for each c in `axes` (cosine ~0.7 to each other)."""
    x = rng.normal(size=(len(axes), DIM))
    x[np.arange(len(axes)), axes] += 6.0
    return unit(x)


def copies(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Near-copies of the rows of `x` (cosine ~0.9999)."""
    return unit(x + rng.normal(scale=0.01, size=x.shape))


def axis_model(k: int) -> KMeans:
    """A flat model whose centroids are e_0 .. e_{k-1}: a row goes to its largest axis."""
    return KMeans(np.eye(k, DIM, dtype=np.float32), None, k)


def model_file(model: KMeans, rows: int, gen: int, own: set[int], before=()) -> Model:
    """The index's model as `SeenIndex.model` reads it: `before` lists (generation, clusters)
    of the rows of the generations before the model's."""
    gens = [np.full(len(c), g, np.int32) for g, c in before]
    clusters = [np.asarray(c, np.int32) for _, c in before]
    arrays = {
        **model.to_arrays(),
        "rows": np.array(rows),
        "gens": np.concatenate([np.zeros(0, np.int32), *gens]),
        "clusters": np.concatenate([np.zeros(0, np.int32), *clusters]),
    }
    return Model(arrays, gen, frozenset(own))


def generation(x: np.ndarray, gen: int, under: KMeans | None) -> pa.RecordBatch:
    """Key rows as a dedup index keeps them: ids, quantised unit rows and scales, the cluster
    under the model the run used (`under`; none for a rebuilt generation), and GEN."""
    writer = method()
    writer._model_used = under
    rows = pa.table({C.ID: [f"g{gen}-{k}" for k in range(len(x))], COL: embeddings(x)})
    for name, column in writer.index_columns(rows).items():
        rows = rows.drop_columns([name]) if name in rows.column_names else rows
        rows = rows.append_column(name, column) if column is not None else rows
    rows = rows.append_column(GEN, pa.array(np.full(len(x), gen, np.int32)))
    return rows.combine_chunks().to_batches()[0]


def method(clusters: int | None = None, seed: int = 0) -> Semantic:
    m = Semantic(COL, EPS, clusters, seed)
    m.bind(pa.schema([(COL, pa.list_(pa.float32(), DIM))]))
    m.for_index = True
    return m


def against_index(
    run: np.ndarray,
    gens: list[pa.RecordBatch],
    model: Model | None,
    clusters: int | None = None,
    seed: int = 0,
) -> tuple[Semantic, np.ndarray]:
    """A Semantic method that scanned `run`, then the index's generations, as `Dedup` scans
    them; and the active rows (those with a usable embedding)."""
    m = method(clusters, seed)
    batch = pa.record_batch({C.ID: [f"r{k}" for k in range(len(run))], COL: embeddings(run)})
    m.scan(pa.RecordBatch.from_pydict({C.ID: batch.column(C.ID), **m.keys(batch)}), 0)
    offset = len(run)
    if gens:
        m.index_from, m.index_model = offset, model
    for g in gens:
        m.scan(g, offset)
        offset += g.num_rows
    active = np.array([p for p in range(offset) if p not in m.failures], np.int64)
    return m, active


def canonical(labels: np.ndarray) -> list[int]:
    """Labels renumbered by first appearance; -1 (in no group) stays."""
    seen: dict[int, int] = {}
    return [-1 if v < 0 else seen.setdefault(int(v), len(seen)) for v in labels]


def brute_labels(x: np.ndarray, clusters: np.ndarray, index_from: int | None = None) -> list:
    """Components of all pairs with cosine > 1 - EPS in one cluster (with an index: no pair of
    two index rows), -1 for a row in none; the cosines keep clear of the threshold."""
    sim = unit(x) @ unit(x).T
    n = len(x)
    pair = np.triu(clusters[:, None] == clusters[None, :], 1)
    if index_from is not None:
        pair[index_from:, index_from:] = False
    assert np.abs(sim[pair] - (1 - EPS)).min() > 0.01
    i, j = np.nonzero(pair & (sim > 1 - EPS))
    _, comp = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)))
    linked = np.zeros(n, bool)
    linked[i] = linked[j] = True
    return canonical(np.where(linked, comp, -1))


def axis_of(x: np.ndarray, k: int) -> np.ndarray:
    """The cluster `axis_model(k)` gives each row, computed here: its largest of k axes."""
    return np.argmax(x[:, :k], axis=1)


# -- the index model's refit rule ------------------------------------------------------------


@pytest.mark.parametrize(("run_rows", "refit"), [(10, False), (11, True)])
def test_index_model_is_refitted_only_once_active_rows_exceed_twice_its_fitted_rows(
    run_rows, refit
):
    """The model was fitted on 20 rows; 30 index rows plus 10 run rows are exactly twice that
    (kept), one run row more is past it (refitted, on every active row)."""
    rng = np.random.default_rng(1)
    model = axis_model(2)
    index = near_axes(rng, [0, 1] * 15)
    run = near_axes(rng, [1, 0] * 6)[:run_rows]
    m, active = against_index(run, [generation(index, 1, model)], model_file(model, 20, 1, {1}))
    m.labels(active)
    assert (m.fitted_model is not None) == refit
    if refit:
        assert int(m.fitted_model["rows"]) == 41
        assert m.fitted_model["gens"].tolist() == [1] * 30


@pytest.mark.parametrize(("unclustered", "refit"), [(10, False), (11, True)])
def test_index_model_is_refitted_once_over_half_the_index_rows_have_no_stored_cluster(
    unclustered, refit
):
    """Generation 2 (the model's own, every row in cluster 0) has its clusters; generation 3,
    rebuilt, has none: exactly half the index rows keep the model, one more refits it."""
    rng = np.random.default_rng(2)
    model = axis_model(2)
    known, rebuilt = near_axes(rng, [0] * 10), near_axes(rng, [1, 0] * 6)[:unclustered]
    run = np.r_[copies(rng, rebuilt[:1]), near_axes(rng, [0, 1])]
    gens = [generation(known, 2, model), generation(rebuilt, 3, None)]
    m, active = against_index(run, gens, model_file(model, 1000, 2, {2}))
    labels = m.labels(active)
    assert (m.fitted_model is not None) == refit
    if refit:
        assert m.fitted_model["gens"].tolist() == [2] * 10 + [3] * unclustered
    x = np.r_[run, known, rebuilt]
    assert canonical(labels) == brute_labels(x, axis_of(x, 2), len(run))
    assert canonical(labels) == [0] + [-1] * 12 + [0] + [-1] * (unclustered - 1)


def test_earlier_generations_take_their_clusters_from_the_model_file_not_their_own_column():
    """Generation 1 was clustered by an earlier model (its column says cluster 1 for rows near
    e_0 and 0 for rows near e_1); the model file holds their clusters under the index's model:
    those are used, no row misses one, so nothing is refitted and copies are found."""
    rng = np.random.default_rng(3)
    model, earlier = axis_model(2), KMeans(np.eye(2, DIM, dtype=np.float32)[::-1].copy(), None, 2)
    old, own = near_axes(rng, [0, 1] * 5 + [0]), near_axes(rng, [1, 0] * 5)
    run = np.r_[copies(rng, old[[0, 1]]), copies(rng, own[[2]]), near_axes(rng, [1])]
    stored = model_file(model, 1000, 2, {2}, before=[(1, axis_of(old, 2))])
    gens = [generation(old, 1, earlier), generation(own, 2, model)]
    m, active = against_index(run, gens, stored)
    labels = m.labels(active)
    assert m.fitted_model is None
    x = np.r_[run, old, own]
    assert canonical(labels) == brute_labels(x, axis_of(x, 2), len(run))
    assert canonical(labels) == [0, 1, 2, -1, 0, 1] + [-1] * 11 + [2] + [-1] * 7


def test_a_generation_the_model_file_holds_at_another_length_counts_as_unclustered():
    """The model file lists 3 clusters for generation 1's 11 rows: none of them is taken, so
    11 of 21 index rows have no cluster and the model is refitted on every active row."""
    rng = np.random.default_rng(4)
    model = axis_model(2)
    old, own = near_axes(rng, [0, 1] * 5 + [0]), near_axes(rng, [1, 0] * 5)
    run = np.r_[copies(rng, old[[3]]), near_axes(rng, [0])]
    stored = model_file(model, 1000, 2, {2}, before=[(1, [0, 1, 0])])
    m, active = against_index(run, [generation(old, 1, model), generation(own, 2, model)], stored)
    labels = m.labels(active)
    assert int(m.fitted_model["rows"]) == 23
    assert m.fitted_model["gens"].tolist() == [1] * 11 + [2] * 10
    assert canonical(labels) == [0] + [-1] * 4 + [0] + [-1] * 17


def test_a_first_run_against_an_empty_index_fits_a_model_and_stages_it_with_no_index_rows():
    rng = np.random.default_rng(5)
    base = near_axes(rng, [0, 1, 2, 3, 4])
    run = np.r_[base, copies(rng, base[[1, 3]])]
    m, active = against_index(run, [], None)
    labels = m.labels(active)
    staged = m.fitted_model
    assert sorted(staged) == ["centroids_0", "children", "clusters", "gens", "rows"]
    assert int(staged["rows"]) == 7 and staged["children"].tolist() == [0]
    assert staged["gens"].dtype == np.int32 and staged["gens"].tolist() == []
    assert staged["clusters"].dtype == np.int32 and staged["clusters"].tolist() == []
    assert canonical(labels) == [-1, 0, -1, 1, -1, 0, 1]


def test_a_refit_against_an_index_fits_the_model_a_run_without_index_fits_on_the_same_rows():
    """Rows are sampled for k-means by their input position (`active`, which skips the run's
    unusable row 0), as `Semantic.labels` samples them without an index; the index rows, of
    +-0.5 in four places, read back from int8 exactly, so both fits see the same rows."""
    rng = np.random.default_rng(6)
    sparse = np.zeros((150, DIM))
    for r in sparse:
        r[rng.choice(DIM, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    run = np.r_[np.full((1, DIM), np.nan), rng.normal(size=(60, DIM))]
    m, active = against_index(run, [generation(sparse, 1, None)], None, clusters=2, seed=3)
    m.labels(active)
    x = unit_rows(np.r_[run, sparse].astype(np.float32))[0][active]
    want = fitted(x, 2, 3, active)
    assert active[0] == 1 and len(active) == 210
    assert not np.array_equal(fitted(x, 2, 3).centroids, want.centroids)
    staged = m.fitted_model
    np.testing.assert_array_equal(staged["centroids_0"], want.centroids)
    assert int(staged["rows"]) == 210 and staged["gens"].tolist() == [1] * 150
    assert staged["gens"].dtype == np.int32 and staged["clusters"].dtype == np.int32
    assert staged["clusters"].tolist() == want.assign(x)[60:].tolist()


# -- pairs with index rows -------------------------------------------------------------------


def test_a_run_row_copying_the_first_index_row_read_is_grouped_with_that_row():
    """Index row 0 is in cluster 1 and row 1 in cluster 0: rows are read by cluster, so row 1
    comes first, and the copy of it must be grouped with row 1, not with row 0."""
    rng = np.random.default_rng(7)
    model = axis_model(2)
    index = near_axes(rng, [1, 0, 1, 0])
    run = np.r_[copies(rng, index[[1]]), near_axes(rng, [1])]
    m, active = against_index(run, [generation(index, 1, model)], model_file(model, 100, 1, {1}))
    labels = m.labels(active)
    assert m.fitted_model is None
    assert canonical(labels) == [0, -1, -1, 0, -1, -1]


def test_clusters_past_the_int16_range_still_pair_run_rows_with_index_rows():
    """A model of 2**15 + 1 clusters: rows near e_1 are in cluster 32768, which a 16-bit sort
    key would put before cluster 0 and so out of order for the search by cluster."""
    rng = np.random.default_rng(8)
    wide = KMeans(rng.normal(size=(2**15, DIM)).astype(np.float32), None, 2**15)
    top = np.eye(2, DIM, dtype=np.float32)
    model = KMeans(top, [wide, KMeans(top[1:].copy(), None, 1)], 2**15 + 1)
    index = near_axes(rng, [1, 0, 1, 0, 0])
    run = copies(rng, index[[0, 1, 2, 3]])
    m, active = against_index(run, [generation(index, 1, model)], model_file(model, 100, 1, {1}))
    x = np.r_[run, index]
    sub = np.argmax(x @ wide.centroids.T, axis=1)
    want = np.where(np.argmax(x @ top.T, axis=1) == 1, 2**15, sub)
    assert (want[:4] == 2**15).sum() == 2 and (want[:4] < 2**15).sum() == 2
    labels = m.labels(active)
    assert canonical(labels) == brute_labels(x, want, len(run))
    assert canonical(labels) == [0, 1, 2, 3, 0, 1, 2, 3, -1]


def test_similarities_and_staged_keys_against_an_index_with_unclustered_rows():
    """Generation 3 (rebuilt) has no clusters: its rows are assigned by the model, which is
    kept (10 of 22 rows); its row 0 is in cluster 1, its row 8 in cluster 0. Similarities of
    dropped run rows to kept rows, index rows (the first among them) or run rows, are the
    cosines to those rows as stored; the kept run rows are staged as int8 unit rows with
    their cluster under the model used."""
    rng = np.random.default_rng(9)
    model = axis_model(2)
    own = near_axes(rng, [0, 1] * 6)
    rebuilt = near_axes(rng, [1, 0, 0, 1, 0, 1, 1, 0, 0, 1])
    twin = near_axes(rng, [1])
    run = np.r_[copies(rng, rebuilt[[0]]), copies(rng, own[[0]]), twin, copies(rng, twin)]
    gens = [generation(own, 2, model), generation(rebuilt, 3, None)]
    m, active = against_index(run, gens, model_file(model, 1000, 2, {2}))
    labels = m.labels(active)
    assert m.fitted_model is None
    x = np.r_[run, own, rebuilt]
    assert canonical(labels) == brute_labels(x, axis_of(x, 2), 4)
    assert canonical(labels) == [0, 1, 2, 2, 1] + [-1] * 11 + [0] + [-1] * 9

    def stored(batch: pa.RecordBatch, rows: list[int]) -> np.ndarray:
        q = np.stack(batch.column(INDEX_UNIT).to_pylist()).astype(np.float32)[rows]
        return q * batch.column(INDEX_SCALE).to_numpy()[rows, None]

    runs = unit_rows(np.asarray(run, np.float32))[0].astype(np.float64)
    kept = np.r_[stored(gens[1], [0]), stored(gens[0], [0]), runs[[2]]].astype(np.float64)
    want = (runs[[0, 1, 3]] * kept).sum(axis=1)
    got = m.values(np.array([0, 1, 3]), np.array([4 + 12, 4, 2]))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert got.min() > 0.99

    staged = m.index_columns(pa.table({COL: embeddings(run[[0, 2]])}))
    assert staged[COL] is None and staged[ERROR] is None
    assert staged[INDEX_CLUSTER].type == pa.int32()
    assert staged[INDEX_CLUSTER].to_pylist() == axis_of(run[[0, 2]], 2).tolist()
    assert staged[INDEX_UNIT].type == pa.list_(pa.int8(), DIM)
    assert staged[INDEX_SCALE].type == pa.float32()


# -- within-run pairs and helpers --------------------------------------------------------------


def test_duplicate_labels_group_rows_only_within_each_cluster_including_the_first_and_last():
    """Cluster 0 is two copies (row 0 first), cluster 1 a single copy of them, cluster 2 (the
    last) two copies and another row: copies in different clusters stay apart."""
    rng = np.random.default_rng(10)
    a, b, other = near_axes(rng, [0, 1, 2])
    x = np.r_[copies(rng, np.stack([a, a, a])), copies(rng, np.stack([b, b])), other[None]]
    clusters = np.array([0, 0, 1, 2, 2, 2])
    labels = duplicate_labels(x.astype(np.float32), clusters, EPS)
    assert canonical(labels) == brute_labels(x, clusters)
    assert canonical(labels) == [0, 0, -1, 1, 1, -1]
    assert duplicate_labels(x[:0].astype(np.float32), clusters[:0], EPS).tolist() == []


def test_a_dense_family_across_distant_row_blocks_has_the_brute_force_components():
    """40 copies in rows 512-551 and 40 in rows 1536-1575: the block of rows 512-1023 against
    rows 1536-2047 holds 1600 edges and is reduced to a spanning forest, whose nodes must map
    back to those rows (not to rows 1024-1063, which are in no group)."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(1600, 32))
    family = rng.normal(size=32)
    x[np.r_[512:552, 1536:1576]] = family + rng.normal(scale=0.01, size=(80, 32))
    x = unit(x).astype(np.float32)
    labels = duplicate_labels(x, np.zeros(1600, np.int64), EPS)
    sim = x.astype(np.float64) @ x.T.astype(np.float64)
    assert ((np.abs(sim - (1 - EPS)) > 0.01) | np.eye(1600, dtype=bool)).all()
    members = np.flatnonzero(labels >= 0).tolist()
    assert members == [*range(512, 552), *range(1536, 1576)]
    assert len(set(labels[members].tolist())) == 1


def test_quantised_rows_reach_127_per_row_and_scale_back_to_unit_length():
    x = np.array([[0.6, -0.8, 0, 0], [0.5, 0.5, 0.5, -0.5], [0, 0, 0, 0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, scale = quantised(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    first = np.rint(np.float32(0.6) * (127 / np.float32(0.8)))
    assert q.tolist() == [[first, -127, 0, 0], [127, 127, 127, -127], [0, 0, 0, 0]]
    norms = [np.sqrt(first**2 + 127.0**2), 254.0]
    assert scale.tolist() == [np.float32(1 / norms[0]), np.float32(1 / 254), 1.0]


def test_share_splits_clusters_by_group_size_as_integers_at_least_one_each():
    got = _share(7, np.array([3, 0, 4]))
    assert got.dtype == np.int64 and got.tolist() == [3, 1, 4]
    assert _share(5, np.array([8, 2])).tolist() == [4, 1]


def test_keys_type_the_error_column_as_strings_when_every_row_is_usable():
    """So the key batches of a run, with and without unusable rows, share one schema."""
    m = method()
    batch = pa.record_batch({COL: embeddings(np.eye(2, DIM))})
    assert m.keys(batch)[ERROR].type == pa.string()
    assert m.keys(batch)[ERROR].to_pylist() == [None, None]


# -- the Ray path: sample, fit, buckets, pairs per bucket --------------------------------------


def test_ray_path_samples_fits_and_pairs_rows_within_clusters_in_any_bucket_split():
    """What `global_ops` does with a semantic method, without Ray: the sample is the usable
    rows `sampled` picks, the model is fitted on them in position order, every usable row
    gets its cluster, the pairs of each bucket are the close pairs within its clusters, and
    similarities are read from the group members' embeddings."""
    rng = np.random.default_rng(12)
    raw = rng.normal(size=(300, DIM))
    raw[250:280] = raw[:30] + rng.normal(scale=0.01, size=(30, DIM))
    raw[7] = 0.0
    keys = pa.table(
        {
            COL: embeddings(raw),
            ERROR: pa.array(problems(embeddings(raw), DIM), pa.string()),
            POSITION: pa.array(np.arange(300), pa.int64()),
        }
    )
    m = Semantic(COL, EPS, 3, 5)
    m.bind(pa.schema([(COL, pa.list_(pa.float32(), DIM))]))
    m.scan(keys.drop_columns([COL, POSITION]).to_batches()[0], 0)
    assert m.failures == {7: ("invalid_embedding", f"{COL}: zero norm")}
    rate = m.sample_rate()
    usable = np.delete(np.arange(300), 7)
    picked = usable[sampled(usable, rate, 5)]
    assert rate < 1 and 0 < len(picked) < len(usable)
    sample = m.sample_rows(keys.take(rng.permutation(300)), rate).sort_by(POSITION)
    x = unit_rows(raw.astype(np.float32))[0]
    assert sample.column_names == [POSITION, "x"]
    assert sample[POSITION].to_pylist() == picked.tolist()
    np.testing.assert_array_equal(np.stack(sample["x"].to_pylist()), x[picked])
    m.fit(sample)
    want = KMeans.fit(x[picked], 3, 5)
    np.testing.assert_array_equal(m.model.centroids, want.centroids)
    clusters = want.assign(x[usable])
    sim = x[usable].astype(np.float64) @ x[usable].T.astype(np.float64)
    close = np.triu((sim > 1 - EPS) & (clusters[:, None] == clusters[None, :]), 1)
    expected = {(int(usable[i]), int(usable[j])) for i, j in zip(*np.nonzero(close), strict=True)}
    assert len(expected) == 29 and len(set(clusters[np.nonzero(close)[0]].tolist())) == 3
    for buckets in (1, 4):
        rows = m.bucket_rows(keys, buckets)
        assert rows[CLUSTER].to_pylist() == clusters.tolist()
        found = set()
        for b in range(buckets):
            bucket = rows.filter(pc.equal(rows[BUCKET], b))
            if not bucket.num_rows:  # Ray's groupby makes no empty group
                continue
            i, j = m.bucket_edges(bucket.take(rng.permutation(bucket.num_rows)))
            assert i.dtype == np.int64 and j.dtype == np.int64
            found |= set(zip(i.tolist(), j.tolist(), strict=True))
        assert found == expected
    kept, dropped = np.array(sorted(expected)[:6]).T
    members = np.r_[kept, dropped]
    m.set_members(keys.select([POSITION, COL]).take(rng.permutation(members)))
    want = (x[dropped].astype(np.float64) * x[kept].astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(m.values(dropped, kept), want, rtol=1e-12, atol=0)
    m.release()
    assert np.isnan(m.values(dropped, kept)).tolist() == [True] * 6


def test_k_means_is_flat_up_to_flat_max_clusters_and_a_tree_beyond():
    """At most FLAT_MAX clusters: one level, exactly k centroids; one more: a top level of
    ceil(sqrt(k)) centroids with a model under each, about k clusters in all."""
    from mmtools.steps.dedup.semantic import FLAT_MAX

    x = np.random.default_rng(3).standard_normal((400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = KMeans.fit(x, FLAT_MAX, seed=0)
    assert flat.children is None and flat.clusters == len(flat.centroids) == FLAT_MAX
    tree = KMeans.fit(x, FLAT_MAX + 1, seed=0)
    assert tree.children is not None and len(tree.centroids) == 9  # ceil(sqrt(65))
    assert len(tree.children) == 9 and abs(tree.clusters - (FLAT_MAX + 1)) <= 9


def test_a_pair_exactly_at_the_cosine_threshold_is_not_a_duplicate_and_just_above_is():
    """README: duplicates when cosine > 1 - eps. Rows e1 and (0.6, 0.8) have cosine exactly
    0.6 in float32, which is 1 - 0.4; in a run and against an index alike."""
    from mmtools.steps.dedup.semantic import close_pairs, fresh_pairs

    x = np.array([[1, 0], [0.6, 0.8]], np.float32)
    assert (x @ x.T)[0, 1] == np.float32(0.6)
    assert close_pairs(x, 0.6)[0].tolist() == []
    assert close_pairs(x, 0.5999)[0].tolist() == [0]
    assert duplicate_labels(x, np.zeros(2, np.int64), 0.4).tolist() == [-1, -1]
    assert duplicate_labels(x, np.zeros(2, np.int64), 0.4001).tolist() == [0, 0]
    zero = np.zeros(1, np.int64)
    for threshold, want in ((0.6, []), (0.5999, [(0, 1)])):
        i, j = fresh_pairs(x[:1], zero, lambda b0, b1: x[1:][b0:b1], zero, threshold)
        assert list(zip(i.tolist(), j.tolist(), strict=True)) == want
