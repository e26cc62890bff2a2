"""The persistent dedup index (`dedup --index DIR`): the keys of every row kept so far.

A directory of generations, one per run that fed it, each an Arrow IPC file of key rows (the
row's id and its `Dedup.keys` as each method's `index_columns` keeps them: digests of
content hashes, pHashes, captions with band codes, quantised unit embeddings), and
`_index.json` listing them with the methods and parameters every key was made with.

Commit protocol, tied to the output a run writes:

1. under the lock (`.lock`; a second run exits 5, or waits with --wait-lock), a run stages
   the keys of the rows it keeps as `pending-N.arrow` and `_pending.json` (naming the
   output and the run's fingerprint) *before* its output commits;
2. after the output's manifest is in place, the pending file is renamed `gen-N.arrow`,
   `_index.json` is rewritten listing it, and `_pending.json` is removed;
3. whoever opens the index next repairs a kill in between: a pending generation whose output
   committed (its manifest carries the same fingerprint) is promoted, any other is dropped
   (its output never committed, so its rows are not anywhere yet).

A generation records its output; a later run writing the same output (a rerun with
--overwrite) replaces it instead of matching against its own rows.

A method with a model (semantic dedup's k-means) keeps it in `model-N.npz`, staged and
promoted with generation N, the run that fitted it; the file also holds the model's cluster
of every row of the generations before N. Each generation records the model its own
cluster column was made with, so a run needs no refit (and reassigns no earlier row)
until the index has doubled since the fit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mmtools.errors import DriftError, UsageError
from mmtools.io.fs import is_remote, store
from mmtools.io.layout import MANIFEST
from mmtools.io.lock import DirLock
from mmtools.io.manifest import fingerprint_digest, fsync_path, read_json, write_json_atomic

FORMAT = "mmtools-dedup-index"
INDEX_FILE, PENDING_FILE, LOCK_NAME = "_index.json", "_pending.json", ".lock"
GEN = "_gen"  # the generation a loaded key row comes from (`SeenIndex.load`)
log = logging.getLogger("mmtools")


def _gen_name(gen: int) -> str:
    return f"gen-{gen:06d}.arrow"


def _pending_name(gen: int) -> str:
    return f"pending-{gen:06d}.arrow"


def _model_name(gen: int, pending: bool = False) -> str:
    return f"{'pending-' if pending else ''}model-{gen:06d}.npz"


@dataclass
class Model:
    """The index's model (its arrays, as the method that fitted it wrote them), the
    generation that fitted it and the generations whose own key columns it made."""

    arrays: dict[str, np.ndarray]
    gen: int
    own: frozenset[int]


def _read(path: str) -> pa.Table:
    """A generation: an Arrow IPC file, memory-mapped (its keys are read, not decoded)."""
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()


def is_index(path: str) -> bool:
    """Whether `path` is a dedup index directory."""
    if is_remote(path) or not os.path.isdir(path):
        return False
    found = read_json(os.path.join(path, INDEX_FILE))
    return bool(found and found.get("format") == FORMAT)


class SeenIndex:
    """One open dedup index: locked from `open` to `close`."""

    def __init__(self, path: str, wait: bool = False):
        if is_remote(path):
            raise UsageError(f"--index must be a local directory, not {path}")
        self.path = path
        self.lock = DirLock(os.path.join(path, LOCK_NAME), wait=wait)
        self.manifest: dict = {}

    # -- opening ---------------------------------------------------------------------------

    def open(self, params: dict | None) -> SeenIndex:
        """Lock, check that the index was made with `params` (None: any), repair a kill."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"--index {self.path} is a file, not a directory")
        if os.path.isdir(self.path) and os.listdir(self.path) and not self._ours():
            raise UsageError(
                f"--index {self.path} holds other files and no {INDEX_FILE}; "
                "give a new or empty directory"
            )
        os.makedirs(self.path, exist_ok=True)
        self.lock.acquire()
        try:
            self.manifest = read_json(self._at(INDEX_FILE)) or {}
            if params is not None and self.manifest.get("params") not in (None, params):
                raise DriftError(
                    f"--index {self.path} was built with other dedup settings "
                    f"({_first_difference(self.manifest['params'], params)}); "
                    "use another directory or the settings it was built with"
                )
            self.repair()
        except BaseException:
            self.close()
            raise
        if params is not None:
            self.manifest.setdefault("params", params)
        return self

    def _ours(self) -> bool:
        mine = (INDEX_FILE, PENDING_FILE, LOCK_NAME, "pending-", "gen-", "model-", ".tmp-")
        return all(name.startswith(mine) for name in os.listdir(self.path))

    def repair(self) -> None:
        """Finish or drop a generation a killed run left pending."""
        pending = read_json(self._at(PENDING_FILE))
        if pending is None:
            self._remove_strays()
            return
        listed = {g["gen"] for g in self.generations}
        if pending["gen"] in listed:
            log.info("dedup index: generation %d was already listed", pending["gen"])
        elif _committed(pending.get("output"), pending["fingerprint"]):
            log.warning(
                "dedup index: adding the keys of %s, whose run was stopped after its output "
                "committed",
                pending["output"],
            )
            self._promote(pending)
        else:
            log.warning(
                "dedup index: dropping keys staged by a run whose output never committed (%s)",
                pending.get("output") or "a stream",
            )
        self._unlink(PENDING_FILE)
        self._remove_strays()

    def _remove_strays(self) -> None:
        listed = {_gen_name(g["gen"]) for g in self.generations}
        if "model" in self.manifest:
            listed.add(_model_name(self.manifest["model"]["gen"]))
        for name in os.listdir(self.path):
            stray = name.startswith(("pending-", ".tmp-")) or (
                name.startswith(("gen-", "model-")) and name not in listed
            )
            if stray:
                self._unlink(name)

    # -- reading ---------------------------------------------------------------------------

    @property
    def generations(self) -> list[dict]:
        """The committed generations, oldest first."""
        return self.manifest.get("generations", [])

    @property
    def rows(self) -> int:
        """Key rows in the committed generations."""
        return sum(g["rows"] for g in self.generations)

    def load(self, skip_output: str | None = None) -> pa.Table | None:
        """The key rows of every generation except those that fed `skip_output`, each with
        its generation (GEN)."""
        return _generations(self.path, self.generations, skip_output, with_gen=True)

    def model(self) -> Model | None:
        """The model the index keeps (`stage(model=...)`), if any."""
        found = self.manifest.get("model")
        if found is None:
            return None
        with np.load(self._at(_model_name(found["gen"]))) as npz:
            arrays = {name: npz[name] for name in npz.files}
        own = frozenset(g["gen"] for g in self.generations if g.get("model") == found["gen"])
        return Model(arrays, found["gen"], own)

    @property
    def next_gen(self) -> int:
        """The number the next staged generation gets."""
        return max([g["gen"] for g in self.generations] + [0]) + 1

    # -- writing ---------------------------------------------------------------------------

    def stage(
        self,
        keys: pa.Table,
        output: str | None,
        fingerprint: str,
        model: dict[str, np.ndarray] | None = None,
        modelled: bool = False,
    ) -> None:
        """Write the key rows of a run's kept rows as a pending generation (before the run's
        output commits), with the model the run fitted (`model`, which replaces the index's)
        or, `modelled`, made its keys with (the index's)."""
        gen = self.next_gen
        if model is not None:
            tmp = self._at(".tmp-" + _model_name(gen))
            with open(tmp, "wb") as f:
                np.savez(f, **model)
            fsync_path(tmp)
            os.replace(tmp, self._at(_model_name(gen, pending=True)))
        tmp, final = self._at(".tmp-" + _pending_name(gen)), self._at(_pending_name(gen))
        with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, keys.schema) as writer:
            writer.write_table(keys.combine_chunks(), max_chunksize=65536)  # few, long chunks
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(self.path)
        record = {
            "gen": gen,
            "rows": keys.num_rows,
            "output": output,
            "fingerprint": fingerprint,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if model is not None:
            record["new_model"] = True
        if model is not None or (modelled and "model" in self.manifest):
            record["model"] = gen if model is not None else self.manifest["model"]["gen"]
        write_json_atomic(self._at(PENDING_FILE), record)
        self.staged = record

    def promote(self) -> None:
        """After the run's output committed: make the staged generation part of the index."""
        record = getattr(self, "staged", None)
        if record is None:
            return
        self._promote(record)
        self._unlink(PENDING_FILE)
        self.staged = None

    def _promote(self, record: dict) -> None:
        gen, output = record["gen"], record.get("output")
        if not os.path.exists(self._at(_gen_name(gen))):
            os.replace(self._at(_pending_name(gen)), self._at(_gen_name(gen)))
            fsync_path(self.path)
        model = {}
        if record.get("new_model"):
            if not os.path.exists(self._at(_model_name(gen))):
                os.replace(self._at(_model_name(gen, pending=True)), self._at(_model_name(gen)))
                fsync_path(self.path)
            model = {"model": {"gen": gen, "bytes": os.path.getsize(self._at(_model_name(gen)))}}
        replaced = [g for g in self.generations if output and g.get("output") == output]
        keep = ("gen", "rows", "output", "fingerprint", "created", "model")
        entry = {k: record[k] for k in keep if k in record}
        entry["bytes"] = os.path.getsize(self._at(_gen_name(gen)))
        self.manifest = {
            **self.manifest,
            **model,
            "format": FORMAT,
            "version": 1,
            "generations": [g for g in self.generations if g not in replaced] + [entry],
        }
        self.manifest["rows"] = self.rows
        write_json_atomic(self._at(INDEX_FILE), self.manifest)
        for g in replaced:  # a rerun into the same output took their place
            self._unlink(_gen_name(g["gen"]))
        self._remove_strays()  # a model this one replaced

    def keep_only(self, outputs: list[str]) -> None:
        """Drop the generations that fed any other output (after a rebuild)."""
        gone = [g for g in self.generations if g.get("output") not in outputs]
        if not gone:
            return
        self.manifest["generations"] = [g for g in self.generations if g not in gone]
        self.manifest["rows"] = self.rows
        write_json_atomic(self._at(INDEX_FILE), self.manifest)
        for g in gone:
            self._unlink(_gen_name(g["gen"]))

    def close(self) -> None:
        """Release the lock (a staged generation stays pending for the next opener)."""
        self.lock.release()

    def _at(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._at(name))


def _committed(output: str | None, fingerprint: str) -> bool:
    """Whether `output` holds a committed dataset made by the run with `fingerprint`."""
    if not output or output == "-":
        return False
    manifest = store(output).read_json(MANIFEST)
    return bool(manifest) and fingerprint_digest(manifest.get("fingerprint", {})) == fingerprint


def _first_difference(old: dict, new: dict) -> str:
    for key in ["methods", *sorted(set(old) | set(new))]:
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} then, {new.get(key)!r} now"
    return "they differ"


def key_rows(path: str) -> pa.Table | None:
    """The key rows of every committed generation of the index at `path`, oldest first
    (read without the lock: what the last commit left)."""
    manifest = read_json(os.path.join(path, INDEX_FILE)) or {}
    return _generations(path, manifest.get("generations", []))


def _generations(path: str, gens: list[dict], skip_output=None, with_gen: bool = False):
    """The key rows of `gens` (but those that fed `skip_output`) in one table, or None;
    `with_gen`: with the generation of each row (GEN)."""
    tables = []
    for g in gens:
        if skip_output is not None and g.get("output") == skip_output:
            continue
        table = _read(os.path.join(path, _gen_name(g["gen"])))
        if with_gen:
            table = table.append_column(GEN, pa.repeat(pa.scalar(g["gen"], pa.int32()), len(table)))
        tables.append(table)
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def describe(path: str) -> dict:
    """What `mmtools info` prints for an index: rows, methods, settings, size, the runs."""
    manifest = read_json(os.path.join(path, INDEX_FILE)) or {}
    gens = manifest.get("generations", [])
    return {
        "index": path,
        "rows": sum(g["rows"] for g in gens),
        "methods": (manifest.get("params") or {}).get("methods", []),
        "params": manifest.get("params"),
        "bytes": sum(g.get("bytes", 0) for g in gens) + manifest.get("model", {}).get("bytes", 0),
        "runs": gens,
        "pending": read_json(os.path.join(path, PENDING_FILE)),
    }
