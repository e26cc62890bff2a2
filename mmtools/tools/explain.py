"""`explain`: what every step decided about given rows, followed through the manifests.

A dataset's manifest holds the lineage of every run that made it (piped stages included):
each entry names its steps, the columns they added and the directories it read. Walking
the entries back from the end, the first that read files names the dataset before it,
whose manifest goes on, down to the ingest. Each dataset of that chain is searched for the
ids: its data shards (the row went on), `_rejects/` and `_dropped/` (the row stopped there;
rows of piped stages land in the dataset at the end of the pipe).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmtools import columns as C
from mmtools.errors import UsageError
from mmtools.io.dataset import read_dropped, read_rejects
from mmtools.io.fs import is_remote, join, store
from mmtools.io.layout import MANIFEST

# What the ledger's value is for the rules and methods that measure one (else "value").
VALUE_NAMES = {
    "phash": "pHash distance (bits)",
    "minhash": "caption Jaccard similarity",
    "semantic": "embedding cosine similarity",
    "top_fraction": "rank key",
    "min_words": "words",
    "min_chars": "characters",
    "min_side": "smaller side (px)",
    "max_aspect": "aspect ratio",
    "silence": "silent share",
    "loudness": "loudness (dBFS)",
}
MARKS = (C.DUP_METHOD, C.DUP_KEPT_ID, C.DUP_VALUE)


@dataclass
class Link:
    """One dataset of the chain and the lineage entries its run made: [first, last)."""

    path: str
    manifest: dict
    first: int
    last: int


@dataclass
class Trace:
    """What was found about one id."""

    id: str
    source: str | None = None
    seen: dict[int, tuple[str, int]] = field(default_factory=dict)  # link -> (shard, row)
    events: list[dict] = field(default_factory=list)  # rejects and ledger rows, with "link"
    marks: dict = field(default_factory=dict)  # dedup --mark columns in the final output


def chain(path: str) -> list[Link]:
    """The datasets from the first (the ingest's output) to `path`, following each run's
    inputs back."""
    links: list[Link] = []
    current: str | None = path
    while current is not None and all(link.path != current for link in links):
        manifest = store(current).read_json(MANIFEST)
        if manifest is None:
            if not links:
                raise UsageError(
                    f"{path} is not a finished mmtools dataset (no {MANIFEST}); "
                    "explain reads the manifests that finished runs write"
                )
            break
        lineage = manifest.get("lineage", [])
        parent, first = _parent(manifest, lineage)
        links.insert(0, Link(current, manifest, first, len(lineage)))
        current = parent
    return links


def _parent(manifest: dict, lineage: list[dict]) -> tuple[str | None, int]:
    """The dataset a run read (through its pipe, if any) and the index of the lineage entry
    that read it; None when that input is no mmtools dataset (the ingest's folder)."""
    for i in range(len(lineage) - 1, -1, -1):
        inputs = lineage[i].get("inputs")
        if i == len(lineage) - 1 and not inputs:  # no rows read, or an older manifest
            inputs = _read(manifest.get("fingerprint", {}).get("inputs", []))
        if not inputs:
            return None, i
        if inputs == ["-"]:
            continue
        paths = [d for d in inputs if d.startswith("/") or "://" in d]
        found = [d for d in paths if store(d).exists(MANIFEST)]
        return (found[0] if found else None), i
    return None, 0


def _read(identity: list) -> list[str]:
    """The directories of the input files a run's fingerprint names ('-' for a stream)."""
    if identity[:1] == ["-"]:
        return ["-"]
    files = [f[0] for f in identity if isinstance(f, list) and f and isinstance(f[0], str)]
    return sorted({posixpath.dirname(f) for f in files})


def explain(path: str, ids: list[str]) -> list[dict]:
    """For each id, where it came from and what each step decided, as a JSON-ready dict:
    `fate` is kept, rejected, dropped, unknown (seen, then gone without a record) or
    not_found; each step's `decision` is kept, made (a row the step made), rejected or
    dropped."""
    links = chain(path if is_remote(path) else os.path.abspath(path))
    lineage = links[-1].manifest.get("lineage", [])
    wanted = pa.array(list(dict.fromkeys(ids)), pa.string())
    traces = {i: Trace(i) for i in wanted.to_pylist()}
    for k, link in enumerate(links):
        _search_data(link, k, wanted, traces, final=k == len(links) - 1)
        for fate, table in (
            ("rejected", read_rejects(link.path)),
            ("dropped", read_dropped(link.path)),
        ):
            if table is None:
                continue
            hits = table.filter(pc.is_in(table[C.ID].cast(pa.string()), value_set=wanted))
            for row in hits.to_pylist():  # only the rows asked for
                traces[row[C.ID]].events.append({"fate": fate, "link": k, **row})
    return [_report(traces[i], links, lineage) for i in traces]


def _search_data(link: Link, k: int, wanted: pa.Array, traces: dict, final: bool) -> None:
    """Note the shard and row of each wanted id in the data of `link`, and its source."""
    names = {f["name"] for f in link.manifest.get("schema", [])}
    columns = [c for c in (C.ID, C.SOURCE, C.IS_DUPLICATE, *MARKS) if c in names]
    st = store(link.path)
    for shard in link.manifest.get("shards", []):
        table = pq.read_table(st.path(shard["name"]), columns=columns, filesystem=st.filesystem())
        hit = pc.is_in(table[C.ID].cast(pa.string()), value_set=wanted)
        for at in np.flatnonzero(hit.to_numpy(zero_copy_only=False)):
            row = table.slice(int(at), 1).to_pylist()[0]
            trace = traces[row[C.ID]]
            trace.seen.setdefault(k, (shard["name"], int(at)))
            trace.source = trace.source or row.get(C.SOURCE)
            if final and row.get(C.IS_DUPLICATE):
                trace.marks = {m: row.get(m) for m in MARKS}


def _entry_of(event: dict, link: Link, lineage: list[dict]) -> int:
    """The lineage entry (in `link`'s range) whose steps include the event's step."""
    for i in range(link.first, link.last):
        entry = lineage[i]
        if event[C.REJECT_STEP] in entry.get("steps", [entry.get("command")]):
            return i
    return link.last - 1


def _written(i: int, links: list[Link]) -> str:
    """Where lineage entry `i` wrote its output: a dataset, or '-' (down a pipe)."""
    for link in links:
        if link.first <= i < link.last:
            return link.path if i == link.last - 1 else "-"
    return "-"


def _report(trace: Trace, links: list[Link], lineage: list[dict]) -> dict:
    """The JSON-ready account of one id."""
    report = {"id": trace.id, "dataset": links[-1].path, "source": trace.source, "steps": []}
    if not trace.seen and not trace.events:
        return {**report, "fate": "not_found", "output": None}
    for event in trace.events:
        event["entry"] = _entry_of(event, links[event["link"]], lineage)
        report["source"] = report["source"] or event.get(C.REJECT_SOURCE)
    decided = {e["entry"]: e for e in sorted(trace.events, key=lambda e: e["entry"])}
    origin = min([*trace.seen, *(e["link"] for e in trace.events)])
    final = len(links) - 1
    if decided:
        stop, fate = min(decided), decided[min(decided)]["fate"]
    elif final in trace.seen:
        stop, fate = len(lineage) - 1, "kept"
    else:
        last = max(trace.seen)
        stop, fate = links[last].last - 1, "unknown"
        report["missing_from"] = links[last + 1].path
    start, made = links[origin].first, None
    if origin > 0:  # not in the dataset before: a row a step made (mixup)
        own = range(links[origin].first, links[origin].last)
        made = next((i for i in own if lineage[i].get("generated")), None)
        start = start if made is None else made
    for i in range(start, stop + 1):
        entry = lineage[i]
        step = {
            "command": entry.get("command"),
            "argv": entry.get("argv", []),
            "output": _written(i, links),
            "added": entry.get("added"),
            "decision": "made" if i == made else "kept",
        }
        if i in decided:
            step |= _decision(decided[i], links)
        report["steps"].append(step)
    output = None
    if final in trace.seen:
        shard, row = trace.seen[final]
        output = {"dataset": links[-1].path, "shard": shard, "row": row, **trace.marks}
    return {**report, "fate": fate, "output": output}


def _decision(event: dict, links: list[Link]) -> dict:
    """A reject or ledger row as a step's decision."""
    record = join(
        links[event["link"]].path, "_rejects" if event["fate"] == "rejected" else "_dropped"
    )
    out = {"decision": event["fate"], "step": event[C.REJECT_STEP], "record": record}
    if event["fate"] == "rejected":
        return out | {"reason": event[C.REJECT_REASON], "detail": event[C.REJECT_DETAIL]}
    return out | {k: event[k] for k in (C.DROP_RULE, C.DROP_VALUE, C.DROP_KEPT_ID)}


# -- for people -------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "none"
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _why(step: dict) -> str:
    """One step's decision in words."""
    if step["decision"] == "rejected":
        detail = f" ({step['detail']})" if step.get("detail") else ""
        return f"REJECTED by {step['step']}: {step['reason']}{detail}"
    if step["decision"] == "dropped":
        rule, value = step[C.DROP_RULE], step[C.DROP_VALUE]
        text = f"DROPPED by {step['step']}, rule {rule}"
        if step.get(C.DROP_KEPT_ID) is not None:
            text += f", a duplicate of {step[C.DROP_KEPT_ID]}"
        if value is not None:
            text += f", {VALUE_NAMES.get(rule, 'value')} {_number(value)}"
        return text
    added = step.get("added")
    verdict = "made here (a new row)" if step["decision"] == "made" else "kept"
    return verdict + (f"; added {', '.join(added)}" if added else "")


def _headline(report: dict) -> str:
    fate = report["fate"]
    if fate == "not_found":
        return f"not found in {report['dataset']} or the datasets it was made from"
    if fate == "unknown":
        return (
            f"not in {report['missing_from']}, and no reject or ledger row says why "
            "(was that run made with --no-ledger?)"
        )
    if fate == "kept":
        out = report["output"]
        line = f"in the output: {join(out['dataset'], out['shard'])}, row {out['row']}"
        if out.get(C.DUP_KEPT_ID) is not None:
            value = out.get(C.DUP_VALUE)
            line += f" (marked a duplicate of {out[C.DUP_KEPT_ID]} by {out[C.DUP_METHOD]}"
            name = VALUE_NAMES.get(out[C.DUP_METHOD], "value")
            line += f", {name} {_number(value)})" if value is not None else ")"
        return line
    return next(_why(s) for s in report["steps"] if s["decision"] == fate).replace(
        fate.upper(), fate, 1
    )


def render(report: dict) -> str:
    """An id's account for a person: the verdict, then each step with its decision."""
    import shlex

    lines = [f"{report['id']}: {_headline(report)}"]
    if report.get("source"):
        lines.append(f"  from {report['source']}")
    width = max((len(s["command"] or "?") for s in report["steps"]), default=0)
    for n, step in enumerate(report["steps"], 1):
        where = "" if step["output"] == "-" else f"  -> {step['output']}"
        lines.append(f"  {n}. {step['command'] or '?':<{width}}  {_why(step)}{where}")
        if step["decision"] in ("rejected", "dropped"):
            lines.append(f"     by:     {shlex.join(step['argv'])}")
            lines.append(f"     record: {step['record']}")
    return "\n".join(lines)
