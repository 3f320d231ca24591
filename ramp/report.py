"""The static HTML report of one pipeline run: one self-contained, byte-deterministic page.

:func:`render_report` reads a finished workspace (the evaluate stage's results, the allocation and its budget, the
embedding's matrix list, the sensitivity stage's costs, the calibrate stage's model pointer) and returns a complete
HTML5 page: a header with the outcome, the results table, the size-vs-KLD Pareto plot, the per-matrix format map,
the per-layer sensitivity, the budget accounting and the provenance. The export stage writes it beside the GGUF
file (``data/export/report.html``) with the exported file's bytes, layout and sha256 (:func:`gguf_layout`).

The page references nothing outside itself: the plots are inline SVG drawn by matplotlib (vector only, text as
text, fixed hash salt, no date), the styles one ``<style>`` block. The same inputs give the same bytes: no
timestamps, no absolute paths, no host names, every mapping printed in sorted order. Every string is escaped.

A required input (``allocation.json``, ``budget.json``) that is missing is a :class:`ReportInputMissing` naming
it; an optional one that is missing turns its section into a line that says which file is missing; an input that
is there but malformed is a :class:`ReportError` naming it. The evaluate stage's ``results.parquet`` is optional:
a large model is often allocated and exported without it (evaluating it in torch is not affordable), and then the
page says "not evaluated" where the results, the KLD/ppl facts, the Pareto plot and the comparisons would be.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ramp.errors import RampError
from ramp.io import atomic_path
from ramp.pipeline.workspace import Workspace

# workspace-relative inputs (names as the page and the errors print them, relative to the workspace root)
RESULTS = "data/evaluate/results.parquet"
ALLOCATION = "data/allocate/allocation.json"
BUDGET = "data/allocate/budget.json"
EMBEDDING = "data/embed/embedding.parquet"
COSTS = "data/sensitivity/costs.parquet"
MODEL = "data/calibrate/model.json"
REPORT = "data/export/report.html"  # where the export stage writes it

RESULT_COLUMNS = ("method", "kind", "file_bytes", "bpw", "allocation_hash", "kld_mean", "kld_p99", "top1", "ppl")
EMBEDDING_COLUMNS = ("gguf_name", "block", "role", "rows", "cols")
COST_COLUMNS = ("gguf_name", "format", "file_bytes", "measured", "kld")
BUDGET_KEYS = ("budget_file_bytes", "budget_matrix_bytes", "matrix_bytes", "overhead_bytes", "embedding_type")
MAX_LABELLED_BLOCKS = 40  # the format map writes the format name in each cell up to this many blocks
SVG_SALT = "ramp-report"  # matplotlib's svg.hashsalt: ids derived from it, not from a random salt


class ReportError(RampError, ValueError):
    """An input of the report is malformed (the message names the file and what was expected)."""


class ReportInputMissing(RampError, FileNotFoundError):
    """A required input of the report does not exist (the message names the file and the stage that writes it)."""


# --------------------------------------------------------------------------------------------- formatting
# One formatter per quantity, used by the header, the tables and the plots' labels alike.


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bad(x: Any) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt_bytes(n: Any) -> str:
    return "n/a" if _bad(n) else f"{int(n):,}"


def fmt_mb(n: Any) -> str:
    return "n/a" if _bad(n) else f"{int(n) / 1e6:.3f}"


def fmt_kld(x: Any) -> str:
    """A KLD: 4 decimals (``0.0145``), scientific below 0.001 (``8.97e-05``)."""
    if _bad(x):
        return "n/a"
    x = float(x)
    return f"{x:.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:.2e}"


def fmt_bpw(x: Any) -> str:
    return "n/a" if _bad(x) else f"{float(x):.3f}"


def fmt_ppl(x: Any) -> str:
    return "n/a" if _bad(x) else f"{float(x):.2f}"


def fmt_pct(x: Any) -> str:
    return "n/a" if _bad(x) else f"{100 * float(x):.1f}%"


def fmt_ratio(x: Any) -> str:
    return "n/a" if _bad(x) else f"{float(x):.3f}×"


def is_llama_cpp(method: str, kind: str) -> bool:
    """A llama.cpp preset row (evaluate names them ``llama.cpp-<preset>``)."""
    return kind == "llama.cpp" or method.startswith("llama.cpp")


# --------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What the report reads from a workspace; None where an optional input is missing (see ``missing``)."""

    results: Any | None  # pandas.DataFrame, sorted by file bytes; None when the evaluate stage did not run
    allocation: dict[str, str]
    budget: dict[str, Any]
    model: dict[str, Any] | None
    embedding: Any | None  # pandas.DataFrame
    costs: Any | None  # pandas.DataFrame
    missing: dict[str, str] = field(default_factory=dict)  # input name -> "not available: <file> missing"

    @property
    def ramp(self) -> Any | None:
        """RAMP's row of the results; None when the evaluate stage did not run."""
        if self.results is None:
            return None
        return self.results[self.results["kind"] == "ramp"].iloc[0]

    @cached_property
    def matrices(self) -> Any:
        """One row per matrix of the embedding with RAMP's format (:func:`_matrices`); needs the embedding."""
        return _matrices(self)


def _path(ws: Workspace, rel: str) -> Path:
    return ws.root / rel


def _missing(ws: Workspace, rel: str, stage: str) -> ReportInputMissing:
    return ReportInputMissing(f"{_path(ws, rel)}: no such file; the report needs it (written by the {stage} stage)")


def _existing(ws: Workspace, rel: str, stage: str, required: bool) -> Path | None:
    """The input's path; None when an optional input is absent (a required one raises, naming its stage)."""
    path = _path(ws, rel)
    if path.is_file():
        return path
    if required:
        raise _missing(ws, rel, stage)
    return None


def _read_json(ws: Workspace, rel: str, stage: str, required: bool) -> Any:
    path = _existing(ws, rel, stage, required)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ReportError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_parquet(ws: Workspace, rel: str, stage: str, columns: Sequence[str], required: bool) -> Any:
    import pandas as pd
    import pyarrow as pa

    path = _existing(ws, rel, stage, required)
    if path is None:
        return None
    try:
        df = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ReportError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from e
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise ReportError(f"{path}: no column {absent[0]!r} (columns: {', '.join(map(str, df.columns))})")
    return df


def _check_results(ws: Workspace, results: Any) -> Any:
    """The evaluate stage's results checked (one RAMP row, one row per method) and sorted by file bytes."""
    n_ramp = int((results["kind"] == "ramp").sum())
    if n_ramp != 1:
        raise ReportError(f"{_path(ws, RESULTS)}: {n_ramp} rows of kind 'ramp'; expected one (RAMP's own result)")
    if results["method"].duplicated().any():
        raise ReportError(
            f"{_path(ws, RESULTS)}: method {results['method'][results['method'].duplicated()].iloc[0]!r} "
            "has more than one row; expected one row per method"
        )
    results["_order"] = results["kind"] != "ramp"  # RAMP first among rows of equal bytes
    results = results.sort_values(["file_bytes", "_order", "method"], kind="stable").drop(columns="_order")
    return results.reset_index(drop=True)


def read_inputs(ws: Workspace) -> Inputs:
    """Read and check what the report shows; see the module docstring for which inputs are required."""
    from ramp.allocation import AllocationError, load_allocation

    results = _read_parquet(ws, RESULTS, "evaluate", RESULT_COLUMNS, required=False)
    if results is not None:
        results = _check_results(ws, results)
    path = _path(ws, ALLOCATION)
    if not path.is_file():
        raise _missing(ws, ALLOCATION, "allocate")
    try:
        allocation = load_allocation(path)
    except AllocationError as e:
        raise ReportError(str(e)) from e
    budget = _read_json(ws, BUDGET, "allocate", required=True)
    absent = [k for k in BUDGET_KEYS if not isinstance(budget.get(k), int | str) or isinstance(budget[k], bool)]
    if absent:
        raise ReportError(f"{_path(ws, BUDGET)}: key {absent[0]!r} missing or not a number/name")
    inputs = Inputs(
        results=results,
        allocation=allocation,
        budget=budget,
        model=_read_json(ws, MODEL, "calibrate", required=False),
        embedding=_read_parquet(ws, EMBEDDING, "embed", EMBEDDING_COLUMNS, required=False),
        costs=_read_parquet(ws, COSTS, "sensitivity", COST_COLUMNS, required=False),
    )
    for name, rel in (("model", MODEL), ("embedding", EMBEDDING), ("costs", COSTS)):
        if getattr(inputs, name) is None:
            inputs.missing[name] = f"not available: {rel} missing"
    if results is None:
        inputs.missing["results"] = (
            f"not evaluated: {RESULTS} missing (written by the evaluate stage, which did not run)"
        )
    return inputs


def gguf_layout(path: str | Path, matrices: Iterable[str]) -> dict[str, int]:
    """Where the bytes of the GGUF file ``path`` go: ``header_bytes`` (header, metadata, tokenizer, tensor infos,
    up to the first tensor's data), ``matrix_bytes`` (the tensors named in ``matrices``), ``norm_bytes`` (the other
    1-D tensors), ``embedding_bytes`` (the other tensors: token embedding, output) and ``file_bytes``. Each
    tensor counts up to the next one's data (its alignment padding included), so the parts sum to the file."""
    from gguf import GGUFReader

    path = Path(path)
    names = set(matrices)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ReportError(f"{path}: not a readable GGUF file ({e})") from e
    size = path.stat().st_size
    tensors = sorted(reader.tensors, key=lambda t: int(t.data_offset))
    starts = [int(t.data_offset) for t in tensors] + [size]
    out = {"header_bytes": starts[0], "matrix_bytes": 0, "norm_bytes": 0, "embedding_bytes": 0, "file_bytes": size}
    for t, begin, end in zip(tensors, starts, starts[1:], strict=False):
        part = "matrix_bytes" if t.name in names else "norm_bytes" if len(t.shape) == 1 else "embedding_bytes"
        out[part] += end - begin
    return out


def pipeline_sections(params: Any) -> dict[str, Any]:
    """Every ``params.yaml`` section some stage reads (the union of ``STAGE_SECTIONS``) of a
    :class:`ramp.params.PipelineParams`, as plain data: what the report prints as its params."""
    from ramp.params import STAGE_SECTIONS, section_data

    names = sorted({s for sections in STAGE_SECTIONS.values() for s in sections if "." not in s})  # keys: in sections
    return {s: section_data(params, s) for s in names}


# --------------------------------------------------------------------------------------------- plots


def _svg(fig: Any, prefix: str, titles: Mapping[str, str] | None = None, label: str = "") -> str:
    """``fig`` as an inline ``<svg>`` element: no XML prolog, no metadata, every id (and reference to one) prefixed
    with ``prefix`` so that several plots share a page; ``titles`` maps a gid to a tooltip."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)
    text = re.sub(r' id="([^"]+)"', rf' id="{prefix}-\1"', text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', text)
    text = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", text)
    for gid, title in sorted((titles or {}).items()):
        tag = f'<g id="{prefix}-{gid}">'
        text = text.replace(tag, f"{tag}<title>{esc(title)}</title>", 1)
    attrs = f' class="plot" role="img" aria-label="{esc(label)}"' if label else ' class="plot"'
    return text.replace("<svg", "<svg" + attrs, 1).strip()


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _rc() -> Any:
    import matplotlib

    return matplotlib.rc_context({"svg.hashsalt": SVG_SALT, "svg.fonttype": "none", "font.size": 9})


def pareto_front(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """The lower-left front of (bytes, KLD) points: each point no other point beats at equal or fewer bytes."""
    front: list[tuple[int, float]] = []
    for b, k in sorted(points):  # by bytes, then KLD: the first of equal bytes is the best of them
        if not front or k < front[-1][1]:
            front.append((b, k))
    return front


def spread(values: Sequence[float], gap: float) -> list[float]:
    """Label positions near ``values`` (same order) at least ``gap`` of their range apart, keeping their order."""
    if not values:
        return []
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    step = gap * max(max(values) - min(values), 1.0)
    placed = [values[order[0]]]
    for i in order[1:]:
        placed.append(max(values[i], placed[-1] + step))
    shift = (sum(placed) - sum(values[i] for i in order)) / len(placed)  # re-centre on the points
    out = [0.0] * len(values)
    for i, y in zip(order, placed, strict=True):
        out[i] = y - shift
    return out


def pareto_svg(inputs: Inputs) -> tuple[str, str]:
    """Size vs mean KLD (log) of every row; returns the SVG and a note on rows left out (KLD not positive)."""
    from matplotlib.lines import Line2D

    r = inputs.results
    ok = r[(r["kld_mean"] > 0) & r["kld_mean"].map(math.isfinite)]
    left_out = sorted(set(r["method"]) - set(ok["method"]))
    note = f"not plotted (mean KLD not positive or not finite): {', '.join(left_out)}" if left_out else ""
    groups: dict[tuple[int, float], list[str]] = {}
    for row in ok.itertuples():
        groups.setdefault((int(row.file_bytes), float(row.kld_mean)), []).append(str(row.method))
    budget_mb = int(inputs.budget["budget_file_bytes"]) / 1e6
    with _rc():
        fig = _figure(7.5, 4.8)
        ax = fig.subplots()
        styles = {
            "ramp": dict(marker="*", s=220, color="#d62728", zorder=5, edgecolor="black", linewidth=0.6),
            "llama.cpp": dict(marker="s", s=55, color="#ff7f0e", zorder=4, edgecolor="black", linewidth=0.5),
            "baseline": dict(marker="o", s=40, color="#1f77b4", zorder=3, edgecolor="black", linewidth=0.5),
        }
        for row in ok.itertuples():
            style = "ramp" if row.kind == "ramp" else "llama.cpp" if is_llama_cpp(row.method, row.kind) else "baseline"
            ax.scatter([row.file_bytes / 1e6], [row.kld_mean], **styles[style])
        front = pareto_front(list(groups))
        if len(front) > 1:
            ax.step([b / 1e6 for b, _ in front], [k for _, k in front], where="post", color="#2ca02c", lw=1.2, ls="-")
        ax.axvline(budget_mb, color="#555555", ls="--", lw=1)
        ax.annotate(
            f"budget {fmt_mb(inputs.budget['budget_file_bytes'])} MB",
            (budget_mb, 0),
            xycoords=("data", "axes fraction"),
            xytext=(3, 4),
            textcoords="offset points",
            fontsize=8,
            color="#555555",
        )
        xs = [b / 1e6 for b, _ in groups] + [budget_mb]
        x_lo, x_hi = min(xs), max(xs)
        span = (x_hi - x_lo) or max(x_hi, 1e-6)
        ax.set_xlim(x_lo - 0.08 * span, x_hi + 0.08 * span)
        labels = [(b, k, " = ".join(sorted(ms, key=lambda m: (m != "ramp", m)))) for (b, k), ms in groups.items()]
        ys = spread([math.log10(k) for _, k, _ in labels], gap=0.045)
        y_lo = min([math.log10(k) for _, k, _ in labels] + ys)
        y_hi = max([math.log10(k) for _, k, _ in labels] + ys)
        pad = 0.08 * ((y_hi - y_lo) or 1.0)
        ax.set_ylim(10 ** (y_lo - pad), 10 ** (y_hi + pad))
        for (b, k, text), y in zip(labels, ys, strict=True):
            right = b / 1e6 > x_lo + 0.7 * span  # labels of the rightmost points go to their left
            ax.annotate(
                f"{text} ({fmt_kld(k)})",
                (b / 1e6, k),
                xytext=(b / 1e6 + (-0.03 if right else 0.03) * span, 10**y),
                ha="right" if right else "left",
                va="center",
                fontsize=7,
                arrowprops=dict(arrowstyle="-", color="#999999", lw=0.5, shrinkA=0, shrinkB=4),
            )
        ax.set(xlabel="file size (MB)", ylabel="mean KLD vs FP (nats/token, log)", yscale="log")
        ax.grid(True, which="major", color="#dddddd", lw=0.6)
        handles = [
            Line2D([], [], marker="*", ls="", color="#d62728", markeredgecolor="black", markersize=12, label="RAMP"),
            Line2D([], [], marker="s", ls="", color="#ff7f0e", markeredgecolor="black", label="llama.cpp preset"),
            Line2D([], [], marker="o", ls="", color="#1f77b4", markeredgecolor="black", label="baseline"),
            Line2D([], [], color="#2ca02c", label="Pareto front"),
            Line2D([], [], color="#555555", ls="--", label="budget"),
        ]
        ax.legend(handles=handles, fontsize=8, loc="upper right")
        return _svg(fig, "pareto", label="file size vs mean KLD"), note


def _matrices(inputs: Inputs) -> Any:
    """One row per matrix (embedding order): gguf_name, block, role, rows, cols, params, format, bpw, bytes."""
    from ramp.allocation import padded
    from ramp.formats import FormatError, get_format

    emb = inputs.embedding
    m = emb[["gguf_name", "block", "role", "rows", "cols"]].copy()
    m["params"] = m["rows"].astype("int64") * m["cols"].astype("int64")
    m["format"] = m["gguf_name"].map(inputs.allocation)
    bpw, nbytes = [], []
    for row in m.itertuples():
        if not isinstance(row.format, str):
            bpw.append(math.nan)
            nbytes.append(0)
            continue
        try:
            fmt = get_format(row.format)
            bpw.append(fmt.bpw)
            nbytes.append(padded(fmt.bytes_for((int(row.rows), int(row.cols)))))
        except FormatError as e:
            raise ReportError(f"{ALLOCATION}: {row.gguf_name}: {e}") from e
    m["bpw"] = bpw
    m["bytes"] = nbytes
    return m


def _grid(matrices: Any) -> tuple[list[str], list[int]]:
    roles = list(dict.fromkeys(str(r) for r in matrices["role"]))  # model order of first appearance
    blocks = sorted({int(b) for b in matrices["block"]})
    return roles, blocks


def _grid_axes(ax: Any, roles: Sequence[str], blocks: Sequence[int]) -> None:
    """Axes of a role x block grid of unit cells: blocks left to right, roles top to bottom, ticks at cell centres."""
    ax.set_xlim(0, len(blocks))
    ax.set_ylim(len(roles), 0)
    ax.set_xticks([i + 0.5 for i in range(len(blocks))], [str(b) for b in blocks], fontsize=7)
    ax.set_yticks([i + 0.5 for i in range(len(roles))], roles)
    ax.set(xlabel="block", ylabel="role")
    ax.tick_params(length=0)


def format_map_svg(matrices: Any) -> str:
    """Role x block grid of RAMP's format per matrix, coloured by bits per weight (one ``cell-<name>`` each)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch, Rectangle

    roles, blocks = _grid(matrices)
    col = {b: i for i, b in enumerate(blocks)}
    known = matrices[matrices["bpw"].notna()]
    lo, hi = (float(known["bpw"].min()), float(known["bpw"].max())) if len(known) else (0.0, 1.0)
    norm = Normalize(lo - 0.5, hi + 0.5)
    cmap = colormaps["viridis"]
    labelled = len(blocks) <= MAX_LABELLED_BLOCKS
    titles = {}
    with _rc():
        fig = _figure(max(6.0, 0.42 * len(blocks) + 2.8), 0.42 * len(roles) + 1.6)
        ax = fig.subplots()
        for row in matrices.itertuples():
            x, y = col[int(row.block)], roles.index(str(row.role))
            known_fmt = isinstance(row.format, str)
            color = cmap(norm(row.bpw)) if known_fmt else (0.85, 0.85, 0.85, 1.0)
            gid = f"cell-{row.gguf_name}"
            ax.add_patch(Rectangle((x, y), 1, 1, facecolor=color, edgecolor="white", lw=0.8, gid=gid))
            what = f"{row.format} ({fmt_bpw(row.bpw)} bpw, {fmt_bytes(row.bytes)} B)" if known_fmt else "no format"
            titles[gid] = f"{row.gguf_name}: {what}"
            if labelled:
                light = known_fmt and norm(row.bpw) < 0.55
                ax.text(
                    x + 0.5,
                    y + 0.5,
                    str(row.format) if known_fmt else "?",
                    ha="center",
                    va="center",
                    fontsize=6.5 if len(blocks) <= 16 else 5.5,
                    color="white" if light else "black",
                    rotation=0 if len(blocks) <= 16 else 90,
                )
        _grid_axes(ax, roles, blocks)
        for side in ax.spines.values():
            side.set_visible(False)
        formats = sorted({(float(r.bpw), str(r.format)) for r in known.itertuples()})
        handles = [Patch(facecolor=cmap(norm(b)), label=f"{f} ({fmt_bpw(b)} bpw)") for b, f in formats]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        return _svg(fig, "formats", titles, label="per-matrix format map")


def lowest_format_costs(costs: Any) -> Any:
    """Per matrix, the costs row of its lowest format (fewest file bytes; ties by format name)."""
    c = costs.sort_values(["gguf_name", "file_bytes", "format"], kind="stable")
    return c.groupby("gguf_name", sort=True).head(1).set_index("gguf_name")


def sensitivity_svg(matrices: Any, lowest: Any) -> str:
    """Per block the summed KLD (bars) and the role x block heatmap of each matrix's KLD (log colour)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    roles, blocks = _grid(matrices)
    col = {b: i for i, b in enumerate(blocks)}
    kld = {name: float(lowest.loc[name, "kld"]) for name in matrices["gguf_name"] if name in lowest.index}
    positive = [v for v in kld.values() if v > 0 and math.isfinite(v)]
    vmin, vmax = (min(positive), max(positive)) if positive else (1e-6, 1e-5)
    if vmax <= vmin:
        vmax = vmin * 10
    norm = LogNorm(vmin, vmax)
    cmap = colormaps["magma_r"]
    titles = {}
    per_block = {b: 0.0 for b in blocks}
    for row in matrices.itertuples():
        v = kld.get(row.gguf_name)
        if v is not None and math.isfinite(v):
            per_block[int(row.block)] += v
    with _rc():
        fig = _figure(max(6.0, 0.42 * len(blocks) + 2.8), 0.42 * len(roles) + 4.0)
        bars, heat = fig.subplots(2, 1, height_ratios=[1.0, max(1.0, 0.42 * len(roles) / 2.2)], sharex=True)
        bars.bar([i + 0.5 for i in range(len(blocks))], [per_block[b] for b in blocks], width=0.8, color="#9467bd")
        bars.set(ylabel="sum of KLD")
        bars.grid(True, axis="y", color="#dddddd", lw=0.6)
        for row in matrices.itertuples():
            x, y = col[int(row.block)], roles.index(str(row.role))
            v = kld.get(row.gguf_name)
            good = v is not None and v > 0 and math.isfinite(v)
            color = cmap(norm(v)) if good else (0.85, 0.85, 0.85, 1.0)
            gid = f"sens-{row.gguf_name}"
            heat.add_patch(Rectangle((x, y), 1, 1, facecolor=color, edgecolor="white", lw=0.8, gid=gid))
            fmt = lowest.loc[row.gguf_name, "format"] if row.gguf_name in lowest.index else "no costs row"
            titles[gid] = f"{row.gguf_name}: KLD {fmt_kld(v)} at {fmt}"
        _grid_axes(heat, roles, blocks)
        mesh = heat.pcolormesh(np.zeros((1, 1)) + vmin, norm=norm, cmap=cmap, visible=False)
        bar = fig.colorbar(mesh, ax=heat, label="KLD (log)")
        bar.solids.set_rasterized(False)  # vector, not an embedded PNG
        return _svg(fig, "sensitivity", titles, label="per-layer sensitivity")


# --------------------------------------------------------------------------------------------- sections


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], classes: Sequence[str] | None = None) -> str:
    """A table of already-escaped cells; numeric columns are right-aligned by CSS (class ``num``)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if _numeric(c) else f"<td>{c}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _numeric(cell: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,.]+(e[-+]\d+)?(%|×)?|n/a", cell))


NOT_EVALUATED = "not evaluated (the evaluate stage did not run)"


def _na(text: str) -> str:
    return f'<p class="na">{esc(text)}</p>'


def _best_at_size(inputs: Inputs, llama_only: bool) -> Any | None:
    """The row of least mean KLD among the other methods at no more file bytes than RAMP's (llama.cpp presets only
    when ``llama_only``); None when there is none."""
    r = inputs.results
    rows = r[(r["kind"] != "ramp") & (r["file_bytes"] <= inputs.ramp["file_bytes"]) & r["kld_mean"].map(math.isfinite)]
    if llama_only:
        rows = rows[[is_llama_cpp(m, k) for m, k in zip(rows["method"], rows["kind"], strict=True)]]
    if rows.empty:
        return None
    return rows.sort_values(["kld_mean", "method"], kind="stable").iloc[0]


def _n_params(inputs: Inputs) -> int | None:
    if inputs.embedding is None:
        return None
    return int((inputs.embedding["rows"].astype("int64") * inputs.embedding["cols"].astype("int64")).sum())


def _evaluated_facts(inputs: Inputs) -> list[tuple[str, str]]:
    """The header's facts from the evaluate stage's results: RAMP's row and the best other rows at its size."""
    ramp = inputs.ramp
    facts: list[tuple[str, str]] = []
    facts.append(
        (
            "RAMP",
            f"{fmt_bytes(ramp['file_bytes'])} B ({fmt_mb(ramp['file_bytes'])} MB, {fmt_bpw(ramp['bpw'])} bpw) · "
            f'mean KLD <strong class="kld">{fmt_kld(ramp["kld_mean"])}</strong> · p99 KLD {fmt_kld(ramp["kld_p99"])} · '
            f"ppl {fmt_ppl(ramp['ppl'])}"
            + (f" (FP {fmt_ppl(ramp['ppl_fp'])})" if "ppl_fp" in ramp.index else "")
            + f" · top-1 {fmt_pct(ramp['top1'])}",
        )
    )
    for label, llama in (("best llama.cpp at ≤ RAMP's bytes", True), ("best baseline at ≤ RAMP's bytes", False)):
        best = _best_at_size(inputs, llama)
        if best is None:
            what = "llama.cpp preset" if llama else "baseline"
            facts.append((esc(label), f"none: no {what} row at or below {fmt_bytes(ramp['file_bytes'])} B"))
            continue
        ratio = ramp["kld_mean"] / best["kld_mean"] if best["kld_mean"] > 0 else math.nan
        facts.append(
            (
                esc(label),
                f"{esc(best['method'])}: {fmt_bytes(best['file_bytes'])} B, mean KLD {fmt_kld(best['kld_mean'])} · "
                f"RAMP's KLD / its KLD = <strong>{fmt_ratio(ratio)}</strong>",
            )
        )
    return facts


def _not_evaluated_facts(inputs: Inputs, export: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The header's facts about RAMP when the evaluate stage did not run: its bytes (the exported file's, else the
    budget's prediction) and allocation, and that KLD and ppl were not evaluated; no comparisons."""
    budget = inputs.budget
    real = export.get("file_bytes") if export is not None else None
    size = int(real) if real is not None else int(budget["overhead_bytes"]) + int(budget["matrix_bytes"])
    n_formats = len(set(inputs.allocation.values()))
    return [
        (
            "RAMP",
            f"{fmt_bytes(size)} B ({fmt_mb(size)} MB, {'exported' if real is not None else 'predicted'} file) · "
            f"{fmt_bytes(budget['matrix_bytes'])} B of matrices · {fmt_bytes(len(inputs.allocation))} matrices "
            f"allocated in {n_formats} format{'' if n_formats == 1 else 's'}",
        ),
        ("mean KLD · ppl", esc(NOT_EVALUATED)),
    ]


def header_section(inputs: Inputs, export: Mapping[str, Any] | None) -> str:
    budget, model = inputs.budget, inputs.model
    facts: list[tuple[str, str]] = []
    if model is not None:
        sha = str(model.get("sha256", ""))
        facts.append(
            ("model", f'{esc(model.get("source", "n/a"))} · sha256 <code title="{esc(sha)}">{esc(sha[:12])}</code>')
        )
    else:
        facts.append(("model", esc(inputs.missing["model"])))
    n = _n_params(inputs)
    bpw = f" = {fmt_bpw(8 * int(budget['budget_matrix_bytes']) / n)} bpw of the matrices" if n else ""
    facts.append(
        (
            "budget",
            f"{fmt_bytes(budget['budget_file_bytes'])} B whole file "
            f"({fmt_bytes(budget['budget_matrix_bytes'])} B of matrices{bpw})",
        )
    )
    if inputs.results is None:
        facts += _not_evaluated_facts(inputs, export)
    else:
        facts += _evaluated_facts(inputs)
    if export is not None:
        sha = str(export.get("sha256", ""))
        line = f'{fmt_bytes(export.get("file_bytes"))} B · sha256 <code title="{esc(sha)}">{esc(sha[:12])}</code>'
        if export.get("llama_cpp_ppl") is not None:
            line += f" · llama.cpp ppl {fmt_ppl(export['llama_cpp_ppl'])}"
        facts.append(("exported GGUF", line))
    items = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    title = esc(model.get("source", "model")) if model is not None else "model"
    return f'<header><h1>RAMP report: {title}</h1><dl class="facts">{items}</dl></header>'


def results_section(inputs: Inputs) -> str:
    if inputs.results is None:
        return f'<section id="results"><h2>Results</h2>{_na(inputs.missing["results"])}</section>'
    rows, classes = [], []
    for r in inputs.results.itertuples():
        rows.append(
            [
                esc(r.method),
                esc(r.kind),
                fmt_bytes(r.file_bytes),
                fmt_mb(r.file_bytes),
                fmt_bpw(r.bpw),
                fmt_kld(r.kld_mean),
                fmt_kld(r.kld_p99),
                fmt_pct(r.top1),
                fmt_ppl(r.ppl),
            ]
        )
        classes.append("ramp" if r.kind == "ramp" else "llama" if is_llama_cpp(r.method, r.kind) else "")
    header = ["method", "kind", "file bytes", "MB", "bpw", "mean KLD", "p99 KLD", "top-1", "ppl"]
    return (
        '<section id="results"><h2>Results</h2>'
        "<p>Every method of the evaluate stage on the same held-out windows, by file size; RAMP's row is highlighted. "
        "KLD is against the FP model in nats per token; bpw counts the quantizable matrices.</p>"
        f"{_table(header, rows, classes)}</section>"
    )


def pareto_section(inputs: Inputs) -> str:
    if inputs.results is None:
        return f'<section id="pareto"><h2>Size vs KLD</h2>{_na(inputs.missing["results"])}</section>'
    svg, note = pareto_svg(inputs)
    return (
        '<section id="pareto"><h2>Size vs KLD</h2>'
        "<p>File size against mean KLD (log scale). RAMP is the star, llama.cpp presets squares; the green step line "
        "is the lower-left Pareto front, the dashed line the budget.</p>"
        f"{svg}{_na(note) if note else ''}</section>"
    )


def format_section(inputs: Inputs) -> str:
    head = '<section id="formats"><h2>Per-matrix format map</h2>'
    if inputs.embedding is None:
        counts = {}
        for f in inputs.allocation.values():
            counts[f] = counts.get(f, 0) + 1
        rows = [[esc(f), fmt_bytes(n), "n/a"] for f, n in sorted(counts.items())]
        return f"{head}{_na(inputs.missing['embedding'])}{_table(['format', 'matrices', 'bytes'], rows)}</section>"
    m = inputs.matrices
    notes = []
    unplaced = m[m["format"].isna()]
    if len(unplaced):
        notes.append(
            f"{len(unplaced)} matrices of {EMBEDDING} have no format in {ALLOCATION}: "
            f"{', '.join(unplaced['gguf_name'][:5])}"
        )
    extra = sorted(set(inputs.allocation) - set(m["gguf_name"]))
    if extra:
        notes.append(f"{len(extra)} matrices of {ALLOCATION} are not in {EMBEDDING}: {', '.join(extra[:5])}")
    by_format: dict[str, list] = {}
    for r in m[m["format"].notna()].itertuples():
        entry = by_format.setdefault(str(r.format), [float(r.bpw), 0, 0, 0])
        entry[1] += 1
        entry[2] += int(r.bytes)
        entry[3] += int(r.params)
    total = sum(v[2] for v in by_format.values()) or 1
    rows = [
        [esc(f), fmt_bpw(b), fmt_bytes(n), fmt_bytes(nbytes), fmt_pct(nbytes / total), fmt_bytes(p)]
        for f, (b, n, nbytes, p) in sorted(by_format.items(), key=lambda kv: (kv[1][0], kv[0]))
    ]
    rows.append(
        [
            "all",
            fmt_bpw(8 * sum(v[2] for v in by_format.values()) / max(1, sum(v[3] for v in by_format.values()))),
            fmt_bytes(sum(v[1] for v in by_format.values())),
            fmt_bytes(sum(v[2] for v in by_format.values())),
            fmt_pct(1.0 if by_format else math.nan),
            fmt_bytes(sum(v[3] for v in by_format.values())),
        ]
    )
    classes = [""] * (len(rows) - 1) + ["total"]
    table = _table(["format", "bpw", "matrices", "bytes", "share of bytes", "weights"], rows, classes)
    roles, blocks = _grid(m)
    caption = (
        f"RAMP's GGUF type for each of the {len(m)} matrices ({len(roles)} roles × {len(blocks)} blocks), "
        "coloured by bits per weight"
        + (
            "; hover a cell for its name and bytes."
            if len(blocks) <= MAX_LABELLED_BLOCKS
            else "; hover a cell for its format."
        )
        + " The all row's bpw is padded file bytes per weight."
    )
    return (
        f"{head}<p>{esc(caption)}</p>{format_map_svg(m)}{''.join(_na(n) for n in notes)}"
        f"<h3>Formats</h3>{table}</section>"
    )


def sensitivity_section(inputs: Inputs) -> str:
    head = '<section id="sensitivity"><h2>Per-layer sensitivity</h2>'
    if inputs.costs is None:
        return f"{head}{_na(inputs.missing['costs'])}</section>"
    if inputs.embedding is None:
        return f"{head}{_na(inputs.missing['embedding'])}</section>"
    m = inputs.matrices
    lowest = lowest_format_costs(inputs.costs)
    names = [n for n in m["gguf_name"] if n in lowest.index]
    measured = sum(1 for n in names if not _bad(float(lowest.loc[n, "measured"])))
    formats = sorted({str(lowest.loc[n, "format"]) for n in names})
    notes = []
    absent = [n for n in m["gguf_name"] if n not in lowest.index]
    if absent:
        notes.append(f"{len(absent)} matrices have no row in {COSTS}: {', '.join(absent[:5])}")
    caption = (
        "The KLD on calibration text when one matrix alone goes to its lowest format ("
        + ", ".join(formats)
        + f"); {measured} of {len(names)} values measured"
        + ("" if measured == len(names) else ", the others estimated by the sensitivity stage")
        + ". "
        "Bars: the sum over each block's matrices; grid: each matrix (log colour)."
    )
    return f"{head}<p>{esc(caption)}</p>{sensitivity_svg(m, lowest)}{''.join(_na(n) for n in notes)}</section>"


def budget_section(inputs: Inputs, export: Mapping[str, Any] | None) -> str:
    b = inputs.budget
    overhead, matrix = int(b["overhead_bytes"]), int(b["matrix_bytes"])
    predicted = overhead + matrix
    rows: list[list[str]] = []
    classes: list[str] = []
    parts = ("embedding_bytes", "norm_bytes", "header_bytes")
    notes = []
    if export is not None and all(k in export for k in parts):
        rows += [
            [f"embeddings ({esc(b['embedding_type'])})", fmt_bytes(export["embedding_bytes"])],
            [f"norms ({esc(b.get('norm_type', 'n/a'))})", fmt_bytes(export["norm_bytes"])],
            ["header, metadata, tokenizer", fmt_bytes(export["header_bytes"])],
        ]
        classes += ["", "", ""]
        if sum(int(export[k]) for k in parts) != overhead:
            notes.append(
                f"the exported file's non-matrix bytes ({fmt_bytes(sum(int(export[k]) for k in parts))}) differ from "
                f"the overhead the budget was resolved with ({fmt_bytes(overhead)})"
            )
    else:
        notes.append("overhead breakdown not available: no exported file passed to the report")
    rows.append(["overhead (not the matrices)", fmt_bytes(overhead)])
    rows.append(["+ matrices", fmt_bytes(matrix)])
    rows.append(["= predicted file", fmt_bytes(predicted)])
    classes += ["total", "", "total"]
    real = export.get("file_bytes") if export is not None else None
    rows.append(["exported file (real)", fmt_bytes(real) if real is not None else "not available"])
    rows.append(["budget (whole file)", fmt_bytes(b["budget_file_bytes"])])
    file_bytes = int(real) if real is not None else predicted
    slack = int(b["budget_file_bytes"]) - file_bytes
    rows.append([f"slack (budget − {'exported' if real is not None else 'predicted'} file)", f"{slack:,}"])
    classes += ["", "", "total"]
    if real is not None and int(real) != predicted:
        notes.append(f"the exported file ({fmt_bytes(real)} B) is not the predicted size ({fmt_bytes(predicted)} B)")
    if slack < 0:
        notes.append(f"over budget by {-slack:,} B")
    body = _table(["part", "bytes"], rows, classes)
    if inputs.embedding is not None:
        m = inputs.matrices
        per_role: dict[str, list[int]] = {}
        for r in m.itertuples():
            e = per_role.setdefault(str(r.role), [0, 0])
            e[0] += 1
            e[1] += int(r.bytes)
        total = sum(v[1] for v in per_role.values())
        role_rows = [
            [esc(k), fmt_bytes(n), fmt_bytes(v), fmt_pct(v / total if total else math.nan)]
            for k, (n, v) in per_role.items()
        ]
        role_rows.append(["all", fmt_bytes(len(m)), fmt_bytes(total), fmt_pct(1.0 if total else math.nan)])
        body += "<h3>Matrix bytes per role</h3>" + _table(
            ["role", "matrices", "bytes", "share"], role_rows, [""] * (len(role_rows) - 1) + ["total"]
        )
        if total != matrix:
            notes.append(
                f"per-role bytes ({fmt_bytes(total)}) differ from {BUDGET}'s matrix_bytes ({fmt_bytes(matrix)})"
            )
    else:
        body += _na(inputs.missing["embedding"])
    return f'<section id="budget"><h2>Budget accounting</h2>{"".join(_na(n) for n in notes)}{body}</section>'


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "dev" if package == "ramp" else "not installed"


def provenance_section(inputs: Inputs, params: Mapping[str, Any] | None, export: Mapping[str, Any] | None) -> str:
    import yaml

    from ramp.allocation import allocation_hash
    from ramp.llamacpp import LLAMA_CPP_VERSION

    model = inputs.model
    computed = allocation_hash(inputs.allocation)
    recorded = str(inputs.ramp["allocation_hash"]) if inputs.ramp is not None else None
    rows = []
    if model is not None:
        rows.append(["model source", esc(model.get("source", "n/a"))])
        rows.append(["model sha256", f"<code>{esc(model.get('sha256', 'n/a'))}</code>"])
    else:
        rows.append(["model", esc(inputs.missing["model"])])
    rows.append(["allocation hash", f"<code>{esc(computed)}</code>"])
    if recorded is None:
        rows.append(["allocation hash of RAMP's evaluated row", esc(NOT_EVALUATED)])
    elif recorded != computed:
        rows.append(
            ["allocation hash of RAMP's evaluated row", f"<code>{esc(recorded)}</code> (differs: stale results?)"]
        )
    sha = export.get("sha256") if export is not None else None
    rows.append(["GGUF sha256", f"<code>{esc(sha)}</code>" if sha else "not available: no exported file passed"])
    rows.append(["policy version", esc(inputs.budget.get("policy_version", "n/a"))])
    versions = {
        "ramp": _version("ramp"),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "gguf": _version("gguf"),
        "llama.cpp (llama-cpp-python)": LLAMA_CPP_VERSION,
    }
    rows += [[esc(k), esc(v)] for k, v in versions.items()]
    if params is None:
        text = _na("params not available: none passed to the report")
    else:
        dumped = yaml.safe_dump(json.loads(json.dumps(dict(params), default=str)), sort_keys=True, allow_unicode=True)
        text = f"<pre>{esc(dumped)}</pre>"
    return (
        f'<section id="provenance"><h2>Provenance</h2>{_table(["item", "value"], rows)}<h3>Params</h3>{text}</section>'
    )


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;
padding:1rem 1.5rem;color:#1b1b1b;background:#fff}
h1{font-size:1.5rem;margin:.2rem 0 .6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem}nav a{margin-right:.8rem}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:0}
dl.facts dt{font-weight:600;color:#444}dl.facts dd{margin:0}
table{border-collapse:collapse;margin:.5rem 0}th,td{padding:.2rem .6rem;border-bottom:1px solid #e4e4e4;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.ramp{background:#fde8e8;font-weight:600}tr.llama{background:#fff4e5}
tr.total td{border-top:1px solid #999;font-weight:600}
svg.plot{max-width:100%;height:auto;display:block;margin:.5rem 0}
p.na{color:#8a4b00;background:#fff8e6;padding:.3rem .6rem;border-left:3px solid #e0a030}
pre{background:#f7f7f7;padding:.6rem;overflow:auto;font-size:12px}code{font-size:12px}
"""


def render_report(
    ws: Workspace, params: Mapping[str, Any] | None = None, export_metrics: Mapping[str, Any] | None = None
) -> str:
    """The report of the finished workspace ``ws`` as one HTML5 page (see the module docstring).

    ``params``: the pipeline's params sections (:func:`pipeline_sections`), printed in the provenance;
    ``export_metrics``: the exported file's ``file_bytes``, ``sha256`` and :func:`gguf_layout` parts (and
    ``llama_cpp_ppl`` when llama.cpp scored it), or None when the report is made without an exported file.
    """
    inputs = read_inputs(ws)
    sections = [
        header_section(inputs, export_metrics),
        '<nav><a href="#results">results</a><a href="#pareto">size vs KLD</a><a href="#formats">format map</a>'
        '<a href="#sensitivity">sensitivity</a><a href="#budget">budget</a><a href="#provenance">provenance</a></nav>',
        results_section(inputs),
        pareto_section(inputs),
        format_section(inputs),
        sensitivity_section(inputs),
        budget_section(inputs, export_metrics),
        provenance_section(inputs, params, export_metrics),
    ]
    title = esc(inputs.model.get("source", "model")) if inputs.model is not None else "model"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>RAMP report: {title}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )


def write_report(
    ws: Workspace,
    params: Mapping[str, Any] | None,
    path: str | Path,
    export_metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Render the report of ``ws`` and write it to ``path`` atomically (UTF-8); returns ``path``."""
    page = render_report(ws, params, export_metrics=export_metrics)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(page.encode("utf-8"))
    return path


def results_table(root: str | Path) -> str:
    """The results as a plain-text table (what ``make demo`` and ``ramp quantize`` print): every method of
    ``data/evaluate/results.parquet`` by file size, the llama.cpp presets among them; one line saying so when the
    evaluate stage did not run."""
    from ramp.pipeline.workspace import Workspace

    t = _read_parquet(Workspace(Path(root)), RESULTS, "evaluate", RESULT_COLUMNS, required=False)
    if t is None:
        return f"no results: {RESULTS} missing (run the evaluate stage)"
    t = t.sort_values(["file_bytes", "method"], kind="stable")
    cols = [c for c in ("method", "file_bytes", "bpw", "kld_mean", "kld_p99", "top1", "ppl", "ppl_fp") if c in t]
    return t[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")
