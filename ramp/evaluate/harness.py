"""Cross-check of :mod:`ramp.evaluate.commonsense` against EleutherAI's lm-evaluation-harness itself.

The harness (``lm_eval``, a dev dependency) scores the same documents with its own packaged task
definitions; only the dataset source is redirected from the hub to the offline Arrow files, and BoolQ's
target to the offline copy's ``answer`` column (the harness reads SuperGLUE's ``label``). Nothing here is
used by the pipeline: it exists so that tests and ``benchmarks/harness_check.py`` can hold our prompts,
tokenization and log-likelihoods to the reference implementation, request by request.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ramp.evaluate.commonsense import (
    FORMATTERS,
    TASKS,
    accuracies,
    choice_loglikelihoods,
    correct_per_doc,
    doc_requests,
    load_task,
    task_docs,
    tokenizer_encode,
)
from ramp.evaluate.perplexity import EvaluationError

# our task -> the harness's packaged task file (relative to lm_eval/tasks)
HARNESS_FILES = {
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}
# fields the offline copies name differently from the hub datasets the harness reads
TARGET_OVERRIDES = {"boolq": "{{ 1 if answer else 0 }}"}
SUFFIX = "_ramp_offline"


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:  # pragma: no cover - lm_eval is a dev dependency
        raise EvaluationError("the harness cross-check needs lm_eval (pip install -e '.[dev]')") from e
    return lm_eval


def _arrow_file(task: str) -> Path:
    from ramp.assets import asset_path

    files = sorted(asset_path(task).glob("*.arrow"))
    if len(files) != 1:
        raise EvaluationError(f"{task}: expected one .arrow file in {asset_path(task)}, found {len(files)}")
    return files[0]


def _resolved_text(src: Path) -> str:
    """A task file's text with a top-level ``include:`` of its sibling expanded (the child's flat
    ``key: value`` lines override the included file's)."""
    text = src.read_text(encoding="utf-8")
    m = re.search(r"^include: (.+)$", text, flags=re.M)
    if m is None:
        return text
    child = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("include:")]
    if any(ln[0] in " -" for ln in child):
        raise EvaluationError(f"{src}: cannot expand include with nested overrides")
    base = _resolved_text(src.parent / m.group(1).strip())
    for ln in child:
        key = ln.split(":", 1)[0]
        base, n = re.subn(rf"^{re.escape(key)}: .*$", lambda _m, ln=ln: ln, base, count=1, flags=re.M)
        if n == 0:
            base += ("" if base.endswith("\n") else "\n") + ln + "\n"
    return base


def write_task_configs(dest: Path, tasks: Sequence[str] = TASKS) -> list[str]:
    """Copy the harness's own task YAMLs (and their helper modules) under ``dest``, renamed
    ``<task>_ramp_offline`` and reading the offline Arrow files; returns the harness task names."""
    unknown = [t for t in tasks if t not in FORMATTERS]
    if unknown:
        raise EvaluationError(f"unknown tasks {unknown}; known tasks: {', '.join(TASKS)}")
    root = Path(_lm_eval().__file__).parent / "tasks"
    names = []
    for task in tasks:
        src = root / HARNESS_FILES[task]
        out = dest / task
        out.mkdir(parents=True, exist_ok=True)
        for helper in src.parent.glob("*.py"):
            shutil.copy(helper, out / helper.name)
        text = _resolved_text(src)
        text = re.sub(r"^tag:\n(?:  - .*\n)+", "", text, flags=re.M)
        text = re.sub(r"^(dataset_name|training_split|test_split|include): .*\n", "", text, flags=re.M)
        text = re.sub(r"^task: .*$", f"task: {task}{SUFFIX}", text, count=1, flags=re.M)
        source = f"dataset_path: arrow\ndataset_kwargs:\n  data_files:\n    validation: {_arrow_file(task)}"
        text, n = re.subn(r"^dataset_path: .*$", source, text, count=1, flags=re.M)
        if n != 1:
            raise EvaluationError(f"{src}: unexpected task file layout (no dataset_path)")
        if task in TARGET_OVERRIDES:
            text = re.sub(r"^doc_to_target: .*$", f'doc_to_target: "{TARGET_OVERRIDES[task]}"', text, flags=re.M)
        (out / f"{task}{SUFFIX}.yaml").write_text(text, encoding="utf-8")
        names.append(task + SUFFIX)
    return names


def harness_scores(
    lm: Any,
    tasks: Sequence[str],
    indices: dict[str, Sequence[int]],
    workdir: Path,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Run the harness on ``lm`` (a loaded model with an HF tokenizer) for the given document indices.

    Returns ``{task: {"metrics": {acc, acc_norm?}, "correct": [per-document acc], "ll": [[per-choice
    log-likelihoods]]}}`` in the order of ``indices[task]``."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = write_task_configs(workdir / "tasks", tasks)
    model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    res = lm_eval.simple_evaluate(
        model=model,
        tasks=names,
        samples={n: [int(i) for i in indices[t]] for n, t in zip(names, tasks, strict=True)},
        log_samples=True,
        task_manager=TaskManager(include_path=str(workdir / "tasks"), include_defaults=False),
    )
    out = {}
    for task, name in zip(tasks, names, strict=True):
        by_id = {s["doc_id"]: s for s in res["samples"][name]}
        rows = [by_id[int(i)] for i in indices[task]]
        wanted = ("acc,none", "acc_norm,none")
        metrics = {k.split(",")[0]: float(v) for k, v in res["results"][name].items() if k in wanted}
        out[task] = {
            "metrics": metrics,
            "correct": [float(s["acc"]) for s in rows],
            "ll": [[float(r[0]) for r in s["filtered_resps"]] for s in rows],
        }
    return out


def compare_with_harness(
    lm: Any,
    tasks: Sequence[str],
    indices: dict[str, Sequence[int]],
    workdir: Path,
    encode: Callable[[str], list[int]] | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Ours against the harness on the same documents: the largest per-request log-likelihood gap, whether
    choice counts and every document's acc agree, and both sets of metrics."""
    enc = encode or tokenizer_encode(lm)
    theirs = harness_scores(lm, tasks, indices, workdir, batch_size)
    out = {}
    for task in tasks:
        docs = task_docs(task, load_task(task), indices[task])
        ours_ll = choice_loglikelihoods(lm.model, doc_requests(docs, enc), batch_size=batch_size, desc=task)
        h = theirs[task]
        shapes_agree = [len(d.continuations) for d in docs] == [len(x) for x in h["ll"]]
        gap = float(np.max(np.abs(np.concatenate(h["ll"]) - ours_ll))) if shapes_agree else float("inf")
        ours_correct = [float(c) for c in correct_per_doc(docs, ours_ll)[0]]
        out[task] = {
            "n": len(docs),
            "max_abs_ll_diff": gap,
            "per_doc_acc_agree": ours_correct == h["correct"],
            "choices_agree": shapes_agree,
            "harness": h["metrics"],
            "ours": accuracies(docs, ours_ll),
        }
    return out
