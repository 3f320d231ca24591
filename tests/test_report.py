"""The HTML report of a pipeline run (ramp.report): self-contained, deterministic, showing the run's own numbers.

The workspace is a real run of the tiny pipeline (the stage functions in-process, as benchmarks run them), whose
export stage writes the report; the tests read it, re-render it, and render copies with inputs taken away.
"""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from ramp.errors import RampError
from ramp.io import sha256_file
from ramp.report import (
    ReportError,
    ReportInputMissing,
    fmt_bytes,
    fmt_kld,
    gguf_layout,
    pareto_front,
    pipeline_sections,
    render_report,
    results_table,
    spread,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
INPUTS = (
    "data/evaluate/results.parquet",
    "data/allocate/allocation.json",
    "data/allocate/budget.json",
    "data/embed/embedding.parquet",
    "data/sensitivity/costs.parquet",
    "data/calibrate/model.json",
)


class Page(HTMLParser):
    """Every element (tag, attrs) of a page, checking that each opened element is closed in order."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()
        assert not self.stack, f"elements never closed: {self.stack}"

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def ids(self, prefix: str) -> list[str]:
        return [a["id"] for _, a in self.elements if a.get("id", "").startswith(prefix)]


# --------------------------------------------------------------------------------------------- no pipeline


def test_formatters_and_the_pareto_front():
    assert fmt_kld(0.01449054202142482) == "0.0145" and fmt_kld(8.969381070485161e-05) == "8.97e-05"
    assert fmt_kld(float("nan")) == "n/a" and fmt_bytes(956064) == "956,064"
    points = [(100, 0.5), (90, 0.7), (120, 0.1), (110, 0.6), (120, 0.05), (130, 0.2), (90, 0.6)]
    assert pareto_front(points) == [(90, 0.6), (100, 0.5), (120, 0.05)]
    ys = spread([0.0, 0.01, 0.02, 2.0], gap=0.1)
    assert ys == sorted(ys) and min(b - a for a, b in zip(ys, ys[1:], strict=False)) >= 0.2 - 1e-12


def test_an_empty_workspace_names_the_first_required_input(tmp_path):
    from ramp.pipeline.workspace import Workspace

    with pytest.raises(ReportInputMissing, match=r"data/allocate/allocation\.json: no such file") as e:
        render_report(Workspace(tmp_path))
    assert isinstance(e.value, RampError) and isinstance(e.value, FileNotFoundError)


NOT_EVALUATED = (
    "not evaluated: data/evaluate/results.parquet missing (written by the evaluate stage, which did not run)"
)


def not_evaluated_checks(ws, params=None, export_metrics=None) -> str:
    """The page of a workspace without the evaluate stage's results, after the checks every such page passes:
    rendered (twice, the same bytes), self-contained, and saying "not evaluated" where results would be."""
    html = render_report(ws, params, export_metrics=export_metrics)
    assert render_report(ws, params, export_metrics=export_metrics) == html
    page = Page(html)
    assert "script" not in {t for t, _ in page.elements} and "<script" not in html
    text = " ".join(page.text)
    assert text.count(NOT_EVALUATED) == 2  # the results section and the Pareto plot's
    assert "mean KLD · ppl not evaluated (the evaluate stage did not run)" in text  # the header
    assert "allocation hash of RAMP's evaluated row not evaluated (the evaluate stage did not run)" in text
    assert "best llama.cpp" not in text and "best baseline" not in text and 'class="kld"' not in html
    assert not page.ids("pareto-")  # no Pareto plot
    assert results_table(ws.root) == ("no results: data/evaluate/results.parquet missing (run the evaluate stage)")
    return html


def test_a_workspace_without_results_is_reported_as_not_evaluated(tmp_path):
    """A large model allocated and exported without the evaluate stage: the page still says what it can."""
    from ramp.pipeline.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    (ws.root / "data/allocate").mkdir(parents=True)
    allocation = {"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_down.weight": "Q6_K"}
    (ws.root / "data/allocate/allocation.json").write_text(json.dumps(allocation))
    budget = {
        "budget_file_bytes": 9_000,
        "budget_matrix_bytes": 6_000,
        "matrix_bytes": 5_888,
        "overhead_bytes": 3_000,
        "embedding_type": "Q8_0",
        "policy_version": "registry:ramp-policy@3",
    }
    (ws.root / "data/allocate/budget.json").write_text(json.dumps(budget))
    html = not_evaluated_checks(ws)
    text = " ".join(Page(html).text)
    # the facts that need no results: the budget, RAMP's predicted bytes (no exported file) and its allocation
    assert "9,000 B whole file (6,000 B of matrices)" in text
    assert "8,888 B (0.009 MB, predicted file) · 5,888 B of matrices · 2 matrices allocated in 2 formats" in text
    assert "registry:ramp-policy@3" in text
    # with an exported file, its bytes
    meta = {"file_bytes": 8_960, "sha256": "ab" * 32}
    html = not_evaluated_checks(ws, export_metrics=meta)
    assert "8,960 B (0.009 MB, exported file)" in " ".join(Page(html).text)
    # the results are optional, but ones that are there are still checked
    (ws.root / "data/evaluate").mkdir(parents=True)
    (ws.root / "data/evaluate/results.parquet").write_bytes(b"not parquet")
    with pytest.raises(ReportError, match=r"results\.parquet: not a readable Parquet file"):
        render_report(ws)


# --------------------------------------------------------------------------------------------- the tiny run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The tiny pipeline run in-process (about 20 s): (workspace, params sections, export metrics)."""
    from ramp.params import load_pipeline
    from ramp.pipeline.run import run_pipeline
    from ramp.pipeline.workspace import Workspace
    from tests.pipeline.harness import TINY

    root = tmp_path_factory.mktemp("report")
    ws = Workspace(root / "ws", quant_cache=root / "quant")
    params = load_pipeline(REPO / "params.yaml", TINY)
    metrics = run_pipeline(params, ws)
    return ws, pipeline_sections(params), metrics["export"]


def exported(ws) -> dict:
    """What the export stage passes to the renderer, recomputed from the exported file."""
    gguf = ws.stage("export") / "model.gguf"
    allocation = json.loads((ws.stage("allocate") / "allocation.json").read_text())
    return {"file_bytes": gguf.stat().st_size, "sha256": sha256_file(gguf), **gguf_layout(gguf, allocation)}


def copy_inputs(ws, root: Path, leave_out: tuple[str, ...] = ()):
    """A workspace at ``root`` holding the report's inputs of ``ws`` except ``leave_out``."""
    from ramp.pipeline.workspace import Workspace

    for rel in INPUTS:
        if rel not in leave_out:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ws.root / rel, root / rel)
    return Workspace(root)


slow = pytest.mark.slow  # the tiny pipeline, once for the module: about 20 s


@slow
def test_export_stage_writes_the_report_beside_the_gguf(run):
    ws, params, metrics = run
    assert metrics["report"] == "data/export/report.html"
    assert sorted(p.name for p in ws.stage("export").iterdir()) == ["model.gguf", "report.html"]
    assert not list(ws.data.glob(".*.tmp"))
    page = (ws.root / metrics["report"]).read_text(encoding="utf-8")
    # the stage's page is the one the renderer gives for the same inputs: regenerable, byte for byte
    assert render_report(ws, params, export_metrics=exported(ws)) == page
    assert f"<code>{metrics['sha256']}</code>" in page and fmt_bytes(metrics["file_bytes"]) in page


@slow
def test_page_is_self_contained(run):
    ws, params, _ = run
    page = Page((ws.stage("export") / "report.html").read_text(encoding="utf-8"))
    tags = {t for t, _ in page.elements}
    assert {"svg", "table", "style", "pre"} <= tags
    assert not tags & {"script", "link", "img", "iframe", "object", "embed", "image", "use_external"}
    assert sum(1 for t, _ in page.elements if t == "svg") == 3  # Pareto, format map, sensitivity
    for tag, attrs in page.elements:
        for name, value in attrs.items():
            if name.startswith("xmlns"):
                continue  # namespace names, never fetched
            assert name != "src", (tag, attrs)
            if name.endswith("href"):
                assert value.startswith("#"), (tag, name, value)
            for target in value.split("url(")[1:]:
                assert target.startswith("#"), (tag, name, value)
            assert "http:" not in value and "https:" not in value and "data:" not in value, (tag, name, value)
    text = "".join(page.text)
    assert "http" not in text and "@import" not in text and "url(" not in text.replace("url(#", "")
    # every in-page reference points at an element of the page, and ids are unique
    ids = [a["id"] for _, a in page.elements if "id" in a]
    assert len(ids) == len(set(ids))
    refs = {v[1:] for _, a in page.elements for k, v in a.items() if k.endswith("href")}
    assert refs <= set(ids)


@slow
def test_page_shows_the_runs_numbers(run):
    from ramp.allocation import allocation_hash

    ws, _, _ = run
    html = (ws.stage("export") / "report.html").read_text(encoding="utf-8")
    results = pd.read_parquet(ws.stage("evaluate") / "results.parquet")
    ramp = results[results["kind"] == "ramp"].iloc[0]
    kld = fmt_kld(ramp["kld_mean"])
    assert f'<strong class="kld">{kld}</strong>' in html  # the header
    row = next(r for r in html.split("<tr") if r.startswith(' class="ramp"'))  # RAMP's highlighted table row
    assert f">{kld}<" in row and f">{fmt_bytes(ramp['file_bytes'])}<" in row
    allocation = json.loads((ws.stage("allocate") / "allocation.json").read_text())
    assert allocation_hash(allocation) in html and ramp["allocation_hash"] == allocation_hash(allocation)
    model = json.loads((ws.stage("calibrate") / "model.json").read_text())
    assert f"<code>{model['sha256']}</code>" in html and f'title="{model["sha256"]}"' in html
    for method in results["method"]:
        assert f"<td>{method}</td>" in html
    assert "not available" not in html  # every input was there
    llama = results[results["method"].str.startswith("llama.cpp") & (results["file_bytes"] <= ramp["file_bytes"])]
    assert len(llama) and f"{llama.sort_values('kld_mean').iloc[0]['method']}: " in html


@slow
def test_format_map_has_one_cell_per_matrix(run):
    ws, _, _ = run
    html = (ws.stage("export") / "report.html").read_text(encoding="utf-8")
    page = Page(html)
    allocation = json.loads((ws.stage("allocate") / "allocation.json").read_text())
    cells = page.ids("formats-cell-")
    assert sorted(c.removeprefix("formats-cell-") for c in cells) == sorted(allocation)
    assert len(cells) == len(allocation) == 14
    assert len(page.ids("sensitivity-sens-")) == len(allocation)
    text = "".join(page.text)
    for name, fmt in allocation.items():
        assert f"{name}: {fmt} (" in text  # each cell's tooltip names the matrix and its format
    for fmt in set(allocation.values()):  # the format written in the cells (2 blocks <= 40)
        assert text.count(fmt) >= list(allocation.values()).count(fmt)
    # budget accounting: the exported file's parts add up to the budget's overhead + matrices = the file
    budget = json.loads((ws.stage("allocate") / "budget.json").read_text())
    parts = exported(ws)
    assert parts["matrix_bytes"] == budget["matrix_bytes"]
    assert parts["header_bytes"] + parts["norm_bytes"] + parts["embedding_bytes"] == budget["overhead_bytes"]
    assert f'<td>= predicted file</td><td class="num">{fmt_bytes(parts["file_bytes"])}</td>' in html


@slow
def test_renders_are_byte_identical_wherever_the_workspace_is(run, tmp_path):
    ws, params, _ = run
    meta = exported(ws)
    first = render_report(ws, params, export_metrics=meta)
    assert render_report(ws, params, export_metrics=meta) == first
    elsewhere = copy_inputs(ws, tmp_path / "some" / "other" / "place")
    assert render_report(elsewhere, params, export_metrics=meta) == first
    assert str(ws.root) not in first and str(tmp_path) not in first
    out = write_report(elsewhere, params, tmp_path / "report.html", export_metrics=meta)
    assert out.read_bytes() == first.encode("utf-8") and not list(tmp_path.glob(".*.tmp"))


@slow
def test_missing_required_input_is_one_error_naming_it(run, tmp_path):
    ws, params, _ = run
    for rel in ("data/allocate/allocation.json", "data/allocate/budget.json"):
        root = tmp_path / rel.replace("/", "_")
        copy = copy_inputs(ws, root, leave_out=(rel,))
        with pytest.raises(ReportInputMissing) as e:
            render_report(copy, params)
        assert str(e.value).startswith(f"{root / rel}: no such file")
        assert isinstance(e.value, RampError)
    # one that is there but not what it should be: named too
    copy = copy_inputs(ws, tmp_path / "bad")
    (copy.stage("allocate") / "budget.json").write_text('{"budget_file_bytes": 1}')
    with pytest.raises(ReportError, match=r"budget\.json: key 'budget_matrix_bytes' missing"):
        render_report(copy, params)
    (copy.stage("evaluate") / "results.parquet").write_bytes(b"not parquet")
    with pytest.raises(ReportError, match=r"results\.parquet: not a readable Parquet file"):
        render_report(copy, params)


@slow
def test_missing_optional_inputs_are_said_not_hidden(run, tmp_path):
    ws, _, _ = run
    copy = copy_inputs(ws, tmp_path / "ws", leave_out=("data/sensitivity/costs.parquet",))
    page = Page(render_report(copy))  # no params, no exported file either
    text = " ".join(page.text)
    assert "not available: data/sensitivity/costs.parquet missing" in text
    assert "params not available: none passed to the report" in text
    assert "overhead breakdown not available" in text
    assert len(page.ids("formats-cell-")) == 14 and not page.ids("sensitivity-sens-")
    copy = copy_inputs(ws, tmp_path / "ws2", leave_out=("data/embed/embedding.parquet", "data/calibrate/model.json"))
    text = " ".join(Page(render_report(copy)).text)
    assert "not available: data/embed/embedding.parquet missing" in text
    assert "not available: data/calibrate/model.json missing" in text


@slow
def test_the_run_without_its_results_still_reports_the_rest(run, tmp_path):
    ws, params, _ = run
    meta = exported(ws)
    copy = copy_inputs(ws, tmp_path / "ws", leave_out=("data/evaluate/results.parquet",))
    html = not_evaluated_checks(copy, params, export_metrics=meta)
    page = Page(html)
    text = " ".join(page.text)
    # every section that needs no results is there in full: format map, sensitivity, budget, provenance
    allocation = json.loads((ws.stage("allocate") / "allocation.json").read_text())
    assert len(page.ids("formats-cell-")) == len(page.ids("sensitivity-sens-")) == len(allocation) == 14
    assert sum(1 for t, _ in page.elements if t == "svg") == 2  # format map, sensitivity: no Pareto plot
    assert f"{fmt_bytes(meta['file_bytes'])} B (" in text and "exported file)" in text
    assert f"<code>{meta['sha256']}</code>" in html
    assert f'<td>= predicted file</td><td class="num">{fmt_bytes(meta["file_bytes"])}</td>' in html
    assert "not available" not in html  # every other input was there
    # the sections after the Pareto plot are the run's own page's, less the evaluated row's hash
    full = render_report(ws, params, export_metrics=meta)
    row = (
        "<tr><td>allocation hash of RAMP's evaluated row</td>"
        "<td>not evaluated (the evaluate stage did not run)</td></tr>"
    )
    assert row in html and row not in full
    assert html.split('<section id="formats">')[1].replace(row, "") == full.split('<section id="formats">')[1]
