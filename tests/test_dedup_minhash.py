"""`mmtools dedup --method minhash`: LSH candidates, Jaccard agreement, edited captions."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
from conftest import hiding, mmtools, read_dataset
from datasketch import MinHash, MinHashLSH
from test_dedup import (
    assert_ray_buckets_give_local_groups,
    found_groups,
    group_pairs,
    precision_recall,
    text_table,
    write_dataset,
)

from mmtools import columns as C
from mmtools.errors import DataContractError, UsageError
from mmtools.steps.dedup.minhash import (
    BANDS,
    KEY,
    LSH_WEIGHTS,
    MinHashText,
    band_codes,
    bands,
    candidate_pairs,
    jaccard,
    shingles,
    signatures,
    similar_pairs,
)

_VOCABULARY = (
    "a the dog cat red blue green small large photo of on in at with and bench park tree house",
    "car street beach sunset mountain river boat woman man child playing running old new wooden",
    "white black yellow field flowers garden city night light window door table chair cup",
    "coffee book reading sitting standing near under over two three happy bright",
)
WORDS = [word for line in _VOCABULARY for word in line.split()]


def edit(words: list[str], rng: np.random.Generator) -> list[str]:
    """One small edit: drop, insert, replace or swap a word, or change case and punctuation."""
    w, k = list(words), int(rng.integers(1, len(words) - 1))
    kind = rng.integers(0, 5)
    if kind == 0:
        del w[k]
    elif kind == 1:
        w.insert(k, str(rng.choice(WORDS)))
    elif kind == 2:
        w[k] = str(rng.choice(WORDS))
    elif kind == 3:
        w[k], w[k + 1] = w[k + 1], w[k]
    else:
        w = [x.upper() if i % 3 == 0 else x for i, x in enumerate(w)]
        w[-1] += "!"
    return w


def edited_captions(n_groups: int, seed: int) -> tuple[list[str], list[str], list[list[str]]]:
    """Captions of 14 to 22 words in groups of one to four edited copies; ids and true groups."""
    rng = np.random.default_rng(seed)
    texts, ids, groups = [], [], []
    for g in range(n_groups):
        base = [str(x) for x in rng.choice(WORDS, rng.integers(14, 23))]
        members = [base] + [edit(base, rng) for _ in range(rng.integers(0, 4))]
        groups.append([f"g{g:03d}-{m}" for m in range(len(members))])
        ids += groups[-1]
        texts += [" ".join(m) for m in members]
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], [ids[i] for i in order], [g for g in groups if len(g) > 1]


def test_lsh_candidates_equal_datasketch_minhashlsh():
    texts, _, _ = edited_captions(60, seed=1)
    sets = [shingles(t.lower(), 2) for t in texts]
    sig = signatures(sets, 128, seed=3)
    i, j = candidate_pairs(sig, 0.6)
    lsh = MinHashLSH(threshold=0.6, num_perm=128, weights=LSH_WEIGHTS)
    hashed = MinHash.bulk([[s.encode() for s in x] for x in sets], num_perm=128, seed=3)
    for k, m in enumerate(hashed):
        assert np.array_equal(m.hashvalues, sig[k])
        lsh.insert(k, m)
    expected = {
        (min(k, q), max(k, q)) for k, m in enumerate(hashed) for q in lsh.query(m) if q != k
    }
    assert len(expected) > 50
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected


def test_signatures_are_datasketchs_for_any_shingles_permutations_and_seed():
    """The values of datasketch's MinHash, bit for bit: band codes kept in a dedup index must
    not change with how they are computed. Shingles of any script, empty ones, sets of one,
    an empty set (every value at its maximum), sets across the hashing blocks' edges."""
    rng = np.random.default_rng(7)
    letters = list("abcxyz é漢字ß🙂 ")
    sets = [
        {"".join(rng.choice(letters, rng.integers(0, 9))) for _ in range(rng.integers(1, 40))}
        for _ in range(1_500)
    ]
    sets[3], sets[4], sets[-1] = set(), {""}, set()
    sets[700] = {f"w{k}" for k in range(20_000)}  # more shingles than one block holds
    for num_perm, seed in ((128, 1), (7, 42), (256, 0)):
        mine = signatures(sets, num_perm, seed)
        theirs = MinHash.bulk([[s.encode() for s in x] for x in sets], num_perm=num_perm, seed=seed)
        assert mine.dtype == np.uint32 and mine.shape == (len(sets), num_perm)
        assert np.array_equal(mine, np.stack([m.hashvalues for m in theirs]))
    assert (signatures([set()], 16, 1) == np.iinfo(np.uint32).max).all()


@pytest.mark.parametrize(
    "num_perm, refused_from", [(2, 0.83), (3, 0.83), (16, 0.98), (64, 1), (128, 1), (250, 1)]
)
def test_band_choice_is_datasketchs_at_every_threshold(num_perm, refused_from):
    """(bands, rows) as datasketch's MinHashLSH picks them for these weights, and refused in
    one line where it refuses (fewer than two bands): from a threshold on, at few permutations."""
    refused = []
    for threshold in np.round(np.arange(0.02, 1.0, 0.03), 2).tolist():
        try:
            lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
        except ValueError:
            refused.append(threshold)
            with pytest.raises(UsageError, match="fewer than two bands"):
                bands(threshold, num_perm)
            continue
        assert bands(threshold, num_perm) == (lsh.b, lsh.r), threshold
    assert refused == [t for t in np.round(np.arange(0.02, 1.0, 0.03), 2) if t >= refused_from]


def test_band_codes_are_equal_exactly_where_a_bands_values_are_and_fixed_across_releases():
    """Two signatures share band k's code exactly when their values in band k are equal (the
    band's number is part of the code: equal values in different bands do not match). The
    codes are kept in dedup indexes, so their values are pinned."""
    b, r = bands(0.6, 128)
    rng = np.random.default_rng(5)
    sig = rng.integers(0, 2**32, (40, 128), dtype=np.uint32)
    for k in range(20):  # row 2k+1 copies row 2k's band k
        sig[2 * k + 1, k * r : (k + 1) * r] = sig[2 * k, k * r : (k + 1) * r]
    sig[39, r : 2 * r] = sig[38, 0:r]  # band 0's values as band 1
    codes = band_codes(sig, 0.6)
    values = sig[:, : b * r].reshape(40, b, r)
    equal_values = (values[:, None] == values[None, :]).all(axis=-1)
    assert codes.shape == (40, b) and codes.dtype == np.uint64
    assert np.array_equal(codes[:, None] == codes[None, :], equal_values)
    assert equal_values.sum() == 40 * b + 2 * 20  # the diagonal and the copied bands
    assert codes[39, 1] != codes[38, 0]
    pinned = band_codes(np.arange(256, dtype=np.uint32).reshape(2, 128), 0.6)[:, :2]
    assert pinned.tolist() == [
        [0xFD1E1CA23B48E60D, 0xDA4DC83A1FCF4E30],
        [0x8B894F7707A1E05F, 0x3EC18ED3E5D3C7BB],
    ]


def test_index_columns_are_the_band_codes_of_each_caption_and_zeros_without_one():
    """A rebuild hands `index_columns` captions this run never signed: their codes are made
    there; a row without a caption gets zeros, as do all rows when none has one."""
    step = MinHashText(threshold=0.6, num_perm=128, shingle=2, seed=1)
    captions = pa.array(["a red car on a street", None, "two cats on a sofa"], pa.string())
    got = step.index_columns(pa.table({KEY: captions}))[BANDS]
    assert got.type == pa.list_(pa.uint64(), 25)
    sig = signatures(
        [shingles(t, 2) for t in ("a red car on a street", "two cats on a sofa")], 128, 1
    )
    expected = band_codes(sig, 0.6)
    rows = np.array(got.to_pylist(), np.uint64)
    assert np.array_equal(rows[[0, 2]], expected) and not rows[1].any()
    none = step.index_columns(pa.table({KEY: pa.array([None, None], pa.string())}))[BANDS]
    assert none.to_pylist() == [[0] * 25, [0] * 25]


def test_labels_keep_copies_and_near_copies_apart_wherever_their_captions_fall():
    """Lone captions get no group; a caption repeated word for word is a group of its own,
    never merged into a group of near copies (whatever the captions' order, which numbers
    them)."""
    captions = ["one lone caption", "two lone captions here", "a dog", "a dog"]
    captions += ["a b c d e f g h", "a b c d e f g x"]
    step = MinHashText(threshold=0.5, num_perm=128, shingle=1, seed=1)
    batch = pa.record_batch({C.TEXT: pa.array(captions, pa.string())})
    step.scan(pa.record_batch(step.keys(batch)), 0)
    got = step.labels(np.arange(6)).tolist()
    assert got[0] == got[1] == -1
    assert got[2] == got[3] >= 0 and got[4] == got[5] >= 0 and got[2] != got[4]


def test_a_dataset_without_captions_is_refused_naming_the_method():
    step = MinHashText(threshold=0.6, num_perm=128, shingle=2, seed=1)
    with pytest.raises(DataContractError) as e:
        step.bind(pa.schema([(C.ID, pa.string()), (C.IMAGE, C.MEDIA_TYPE)]))
    assert str(e.value).startswith("dedup --method minhash needs")


def test_found_pairs_agree_with_brute_force_jaccard():
    texts, _, _ = edited_captions(150, seed=2)
    sets = [shingles(t.lower(), 2) for t in texts]
    found = set(zip(*(a.tolist() for a in similar_pairs(sets, 0.7, 128, seed=1)), strict=True))
    true = {
        (a, b)
        for a, b in itertools.combinations(range(len(sets)), 2)
        if jaccard(sets[a], sets[b]) >= 0.7
    }
    precision, recall = precision_recall(found, true)
    assert len(true) > 100 and precision == 1.0 and recall >= 0.95, (precision, recall)


def test_minhash_finds_captions_with_small_edits(tmp_path):
    """Run where neither datasketch nor polars can be imported: MinHash needs neither (a
    caption column is read by pyarrow), which keeps its peak memory down."""
    texts, ids, true_groups = edited_captions(120, seed=3)
    ds = write_dataset(tmp_path / "ds", text_table([*texts, None, ""], ids=[*ids, "n1", "n2"]), 4)
    out = tmp_path / "out"
    hidden = hiding("datasketch", "polars", root=tmp_path)
    proc = mmtools("dedup", ds, "-o", out, "-m", "minhash", "--mark", env=hidden)
    marked = read_dataset(out)
    precision, recall = precision_recall(
        group_pairs(found_groups(marked)), group_pairs(true_groups)
    )
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)
    assert "clusters: minhash" in proc.stderr.decode()
    assert marked.num_rows == len(texts) + 2
    clusters = dict(zip(marked[C.ID].to_pylist(), marked[C.DUP_CLUSTER].to_pylist(), strict=True))
    assert clusters["n1"] is None and clusters["n2"] is None  # no caption, no duplicate


def test_band_buckets_give_the_same_groups_as_the_local_search():
    """Ray's buckets of LSH band codes, each checked by signature and Jaccard, make the same
    duplicate groups as the local search: edited captions, exact copies, nulls, lone rows."""

    from mmtools.steps.dedup.minhash import KEY, MinHashText

    rng = np.random.default_rng(0)
    words = [f"w{k}" for k in range(60)]
    base = [" ".join(rng.choice(words, 12)) for _ in range(150)]
    edited = [t.replace(t.split()[3], "edited", 1) for t in base[:60]]
    texts = [*base, *edited, *base[:30], None, None, ""]
    order = rng.permutation(len(texts))
    keys = pa.table({KEY: pa.array([texts[k] for k in order], pa.string())})
    assert_ray_buckets_give_local_groups(lambda: MinHashText(0.6, 64, 2, 0), keys, min_groups=60)


def test_a_threshold_lsh_cannot_band_is_refused_in_one_line(tmp_path):
    import pyarrow.parquet as pq
    from conftest import mmtools

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x y z", "x y z"]}), tmp_path / "t.parquet")
    proc = mmtools(
        "dedup",
        tmp_path / "t.parquet",
        "-m",
        "minhash",
        "--threshold",
        "1.0",
        "-o",
        tmp_path / "out",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines()[-1] == (
        "mmtools dedup: error: dedup --threshold 1 with --num-perm 128 leaves MinHash LSH fewer "
        "than two bands; lower --threshold or raise --num-perm (identical captions: -m exact "
        "--exact-key text)"
    )


P, Q, R = "a b c d", "a b c e", "x y z w"  # Jaccard(P, Q) = 3/5 exactly; R shares no word


@pytest.mark.parametrize(
    ("rows", "edges"),
    [
        # (band code, position, caption) per row and band, in the order a bucket holds them
        pytest.param([(1, 0, P), (1, 1, Q)], [(0, 1)], id="pair-at-the-lowest-code"),
        pytest.param([(1, 0, P), (2, 0, P), (2, 1, Q)], [(0, 1)], id="row-in-two-codes"),
        pytest.param([(9, 0, P), (1, 1, Q), (9, 1, Q)], [(0, 1)], id="lower-code-first"),
        pytest.param([(1, 0, P), (1, 1, R), (1, 2, P)], [(0, 2)], id="equal-captions"),
        pytest.param([(1, 0, R), (2, 1, P), (3, 2, Q)], [], id="no-shared-code"),
    ],
)
def test_a_bucket_links_exactly_the_captions_sharing_a_band_code(rows, edges):
    """Ray's bucket check of MinHash candidates: each caption once per code, whatever the
    order of the codes and rows in the bucket; a pair at exactly the Jaccard threshold
    (3/5) is a duplicate."""

    from mmtools.step import POSITION
    from mmtools.steps.dedup.minhash import MinHashText

    code, pos, text = zip(*rows, strict=True)
    bucket = pa.table(
        {"code": pa.array(code, pa.uint64()), POSITION: pa.array(pos, pa.int64()), "text": text}
    )
    i, j = MinHashText(0.6, 64, 1, 0).bucket_edges(bucket)
    assert sorted(zip(i.tolist(), j.tolist(), strict=True)) == edges
