"""`nfs-ha timeline VFS`: the last failovers of a VFS as text Gantt charts, from the agents' spans.

A failover is one trace with a root span named `vfs.*` (vfs.move, vfs.takeover, vfs.release,
vfs.fence) whose subtree carries `nfs_ha.vfs = VFS`. A planned move is one trace across two
nodes, so its timeline shows both the release on the old node and the takeover on the new one.
Spans come from the agents' span files (OTLP/JSON lines, see controller/span_file.py) or from
Jaeger's query API.

Rows are in tree order: each span under its parent, siblings by start time. For the sequential
steps of a failover that is start order; unlike a flat sort it keeps a step that starts while a
span on the other node is still finishing under its own parent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.span_file import DEFAULT_SPAN_FILE, SpanRecord, SpanSourceError, read_spans, rotated, spans_from_jaeger

DEFAULT_SERVICE = "nfs-ha-agent"
ROOT_PREFIX = "vfs."
ERROR_BAR = "#"
OK_BAR = "█"


@dataclass(frozen=True)
class Row:
    depth: int  # 0 for a root span
    name: str
    node: str
    offset_s: float  # start, from the start of the trace
    duration_s: float
    status: str  # OK, ERROR, UNSET
    status_message: str
    span_id: str


@dataclass(frozen=True)
class Timeline:
    trace_id: str
    root: str  # name of the failover's root span, e.g. vfs.move
    vfs: str
    cause: str  # nfs_ha.cause of the root, else of its first descendant that has one
    epoch: int | None
    nodes: list[str]  # in order of first appearance
    start_ns: int  # unix nanoseconds of the trace's first span
    duration_s: float  # first start to last end, over every span of the trace
    rows: list[Row]

    @property
    def start_iso(self) -> str:
        secs, nanos = divmod(self.start_ns, 1_000_000_000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{nanos // 1_000_000:03d}Z"


# --- building ------------------------------------------------------------------------------------

def _by_trace(spans: Iterable[SpanRecord]) -> dict[str, list[SpanRecord]]:
    traces: dict[str, dict[str, SpanRecord]] = defaultdict(dict)
    for span in spans:
        traces[span.trace_id].setdefault(span.span_id, span)  # the same span read twice counts once
    return {tid: list(by_id.values()) for tid, by_id in traces.items()}


def _order(spans: list[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """(depth, span) in tree order; spans whose parent is not in the trace are roots."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = defaultdict(list)
    for s in spans:
        children[s.parent_span_id if s.parent_span_id in ids else None].append(s)
    for group in children.values():
        group.sort(key=lambda s: (s.start_ns, s.end_ns, s.name))
    out: list[tuple[int, SpanRecord]] = []
    seen: set[str] = set()

    def walk(span: SpanRecord, depth: int) -> None:
        if span.span_id in seen:  # a malformed parent cycle must not loop forever
            return
        seen.add(span.span_id)
        out.append((depth, span))
        for child in children.get(span.span_id, []):
            walk(child, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    for span in sorted(spans, key=lambda s: s.start_ns):  # spans only reachable through a cycle
        walk(span, 0)
    return out


def _failover_root(ordered: list[tuple[int, SpanRecord]], vfs: str) -> tuple[SpanRecord, list[SpanRecord]] | None:
    """The first vfs.* root whose subtree is about `vfs`, with that subtree."""
    for i, (depth, span) in enumerate(ordered):
        if depth != 0 or not span.name.startswith(ROOT_PREFIX):
            continue
        subtree = [span]
        for d, s in ordered[i + 1:]:
            if d == 0:
                break
            subtree.append(s)
        if any(s.attributes.get("nfs_ha.vfs") == vfs for s in subtree):
            return span, subtree
    return None


def _first_attr(spans: list[SpanRecord], key: str) -> Any:
    return next((s.attributes[key] for s in spans if s.attributes.get(key) not in (None, "")), None)


def _epoch(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _timeline(spans: list[SpanRecord], vfs: str) -> Timeline | None:
    ordered = _order(spans)
    found = _failover_root(ordered, vfs)
    if found is None:
        return None
    root, subtree = found
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    rows = [Row(depth, s.name, s.node, (s.start_ns - start) / 1e9, s.duration_ns / 1e9, s.status,
                s.status_message, s.span_id) for depth, s in ordered]
    return Timeline(
        trace_id=root.trace_id, root=root.name, vfs=vfs,
        cause=str(_first_attr(subtree, "nfs_ha.cause") or ""),
        epoch=_epoch(_first_attr(subtree, "nfs_ha.epoch")),
        nodes=list(dict.fromkeys(r.node for r in rows if r.node)),
        start_ns=start, duration_s=max(0, end - start) / 1e9, rows=rows,
    )


def timelines(spans: Iterable[SpanRecord], vfs: str, last: int = 5) -> list[Timeline]:
    """The newest `last` failovers of `vfs`, newest first."""
    found = [t for t in (_timeline(group, vfs) for group in _by_trace(spans).values()) if t is not None]
    found.sort(key=lambda t: (t.start_ns, t.trace_id), reverse=True)
    return found[:max(0, last)]


# --- rendering -----------------------------------------------------------------------------------

def _bar(row: Row, total_s: float, width: int) -> str:
    """`width` columns with the span's share of the trace filled in; at least one column."""
    total = total_s if total_s > 0 else 1.0
    begin = min(width - 1, math.floor(row.offset_s / total * width))
    end = min(width, max(begin + 1, math.ceil((row.offset_s + row.duration_s) / total * width - 1e-9)))
    fill = ERROR_BAR if row.status == "ERROR" else OK_BAR
    return " " * begin + fill * (end - begin) + " " * (width - end)


def _axis(total_s: float, width: int) -> str:
    """The bar column's heading: 0 at the left edge, the total at the right one."""
    end = f"{total_s * 1000:.1f} ms"
    return "0" + end.rjust(width - 1) if width >= len(end) + 2 else "0".ljust(width)


def _header(t: Timeline) -> str:
    parts = [f"trace {t.trace_id}", t.root, f"vfs={t.vfs}", f"cause={t.cause or '-'}"]
    if t.epoch is not None:
        parts.append(f"epoch={t.epoch}")
    parts += [f"nodes={','.join(t.nodes) or '-'}", t.start_iso, f"total {t.duration_s * 1000:.1f} ms"]
    return "  ".join(parts)


def render_text(timeline: Timeline, width: int = 60) -> str:
    """A header line, then one row per span: step, node, start (ms), duration (ms), status, bar."""
    width = max(1, width)
    table = [["STEP", "NODE", "START ms", "DUR ms", "STATUS"]]
    for r in timeline.rows:
        table.append(["  " * r.depth + r.name, r.node or "-", f"{r.offset_s * 1000:.1f}",
                      f"{r.duration_s * 1000:.1f}", r.status])
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    right = (False, False, True, True, False)  # numbers right-aligned
    lines = [_header(timeline)]
    for i, cells in enumerate(table):
        text = "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True))
        if i == 0:
            lines.append(f"{text}  |{_axis(timeline.duration_s, width)}|")
            continue
        row = timeline.rows[i - 1]
        tail = f"  {row.status_message}" if row.status == "ERROR" and row.status_message else ""
        lines.append(f"{text}  |{_bar(row, timeline.duration_s, width)}|{tail}")
    return "\n".join(lines)


def _row_json(r: Row) -> dict[str, Any]:
    return {"depth": r.depth, "name": r.name, "node": r.node, "offset_s": round(r.offset_s, 6),
            "duration_s": round(r.duration_s, 6), "status": r.status, "status_message": r.status_message,
            "span_id": r.span_id}


def render_json(timelines: list[Timeline]) -> str:
    """The timelines as a JSON array (newest first, like `timelines`); times in seconds."""
    return json.dumps([{
        "trace_id": t.trace_id, "root": t.root, "vfs": t.vfs, "cause": t.cause, "epoch": t.epoch,
        "nodes": t.nodes, "start": t.start_iso, "start_unix_nano": t.start_ns,
        "duration_s": round(t.duration_s, 6), "rows": [_row_json(r) for r in t.rows],
    } for t in timelines], indent=2)


# --- CLI -----------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_timeline_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `timeline` to an argparse subparsers object; sets `func=cmd_timeline`."""
    p = subparsers.add_parser("timeline", help="the last failovers of a VFS, step by step, from the agents' spans")
    p.add_argument("vfs")
    p.add_argument("--last", type=_positive, default=5, metavar="N", help="how many failovers (default 5)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--file", action="append", metavar="PATH",
                        help=f"span file, repeatable (default: env NFS_HA_SPAN_FILE or {DEFAULT_SPAN_FILE})")
    source.add_argument("--jaeger", metavar="URL", help="read from Jaeger's query API, e.g. http://jaeger:16686")
    p.add_argument("--service", default=DEFAULT_SERVICE, help=f"service name in Jaeger (default {DEFAULT_SERVICE})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_timeline)
    return p


def _load(args: argparse.Namespace) -> tuple[list[SpanRecord], str]:
    """The spans and a description of where they came from. Raises SpanSourceError."""
    if args.jaeger:
        # Filtering on the VFS in Jaeger keeps other VFSs' traces from using up the limit.
        limit = max(20, 4 * args.last)
        spans = spans_from_jaeger(args.jaeger, args.service, limit, tags={"nfs_ha.vfs": args.vfs})
        return spans, f"Jaeger at {args.jaeger} (service {args.service})"
    paths = args.file or [os.environ.get("NFS_HA_SPAN_FILE") or DEFAULT_SPAN_FILE]
    # Each file with what rotation left of it, oldest first; a missing file is still named (its error).
    files = [str(f) for p in paths for f in (rotated(Path(p)) or [Path(p)])]
    return read_spans(files), ", ".join(files)


def cmd_timeline(args: argparse.Namespace) -> int:
    """Print the timelines; 0 if any, 1 if no failover of the VFS was found, 2 if spans are unreadable."""
    try:
        spans, source = _load(args)
    except SpanSourceError as exc:
        print(f"nfs-ha timeline: {exc}", file=sys.stderr)
        return 2
    found = timelines(spans, args.vfs, args.last)
    if not found:
        print(f"nfs-ha timeline: no failover of VFS {args.vfs!r} in {source} ({len(spans)} spans read)",
              file=sys.stderr)
        if args.json:
            print("[]")
        return 1
    if args.json:
        print(render_json(found))
    else:
        print("\n\n".join(render_text(t) for t in found))
    return 0
