"""Zero-shot commonsense accuracy by choice log-likelihood, formatted as lm-evaluation-harness formats it.

Each document becomes one context and 2-5 choices; the model scores ``log P(continuation | context)`` for
each choice (the continuation is the choice after a one-space delimiter). ``acc`` picks the highest
log-likelihood, ``acc_norm`` the highest log-likelihood per character of the choice text (the harness's
length normalisation). Prompts (harness v0.4 task definitions, re-implemented):

| task | context | choices | gold |
|---|---|---|---|
| piqa | ``Question: {goal}\\nAnswer:`` | sol1, sol2 | label |
| hellaswag | ``{activity_label}: {ctx_a} {ctx_b capitalised}`` (WikiHow markup removed) | 4 endings | int(label) |
| winogrande | sentence up to ``_`` + option (partial evaluation) | the rest of the sentence, for both | answer - 1 |
| arc_easy / arc_challenge | ``Question: {question}\\nAnswer:`` | choices.text | index of answerKey in choices.label |
| boolq | ``{passage}\\nQuestion: {question}?\\nAnswer:`` | no, yes | answer |

WinoGrande's partial evaluation varies the *context* (the option fills the blank) and scores the same
continuation, so there ``acc_norm`` equals ``acc``. Subsets of ``n_per_task`` documents are drawn with a
seeded permutation. The usual headline metric per task is in :data:`PRIMARY_METRIC`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ramp.evaluate.perplexity import EvaluationError

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq")
CHANCE = {"piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "boolq": 0.5}
PRIMARY_METRIC = {
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "boolq": "acc",
}


class TaskDataError(EvaluationError):
    """A malformed evaluation row (the message names the task and row index)."""


@dataclass(frozen=True)
class Doc:
    """One multiple-choice document: ``contexts[i]`` + delimiter + ``continuations[i]`` for choice ``i``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    norm_lengths: tuple[int, ...]  # characters used by acc_norm
    gold: int


def _field(task: str, i: int, row: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in row or row[key] is None:
        raise TaskDataError(f"{task} row {i}: missing field {key!r}")
    if not isinstance(row[key], kind):
        raise TaskDataError(f"{task} row {i}: field {key!r} is {type(row[key]).__name__}, expected {kind}")
    return row[key]


def _choice_doc(task: str, i: int, context: str, choices: Sequence[str], gold: int) -> Doc:
    if len(choices) < 2 or any(not isinstance(c, str) or not c for c in choices):
        raise TaskDataError(f"{task} row {i}: expected >= 2 non-empty choices, got {list(choices)!r}")
    if not 0 <= gold < len(choices):
        raise TaskDataError(f"{task} row {i}: gold index {gold} outside the {len(choices)} choices")
    return Doc(tuple(context for _ in choices), tuple(choices), tuple(len(c) for c in choices), gold)


def hellaswag_clean(text: str) -> str:
    """Strip WikiHow ``[header]``-style markup as the harness does (``[title]`` becomes a sentence break)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _piqa(i: int, row: Mapping[str, Any]) -> Doc:
    goal = _field("piqa", i, row, "goal", str)
    sols = [_field("piqa", i, row, k, str) for k in ("sol1", "sol2")]
    label = _field("piqa", i, row, "label", (int, np.integer))
    return _choice_doc("piqa", i, f"Question: {goal}\nAnswer:", sols, int(label))


def _hellaswag(i: int, row: Mapping[str, Any]) -> Doc:
    act = _field("hellaswag", i, row, "activity_label", str)
    ctx_a = _field("hellaswag", i, row, "ctx_a", str)
    ctx_b = _field("hellaswag", i, row, "ctx_b", str)
    endings = _field("hellaswag", i, row, "endings", list)
    label = _field("hellaswag", i, row, "label", str)
    if not label.strip().isdigit():
        raise TaskDataError(f"hellaswag row {i}: label {label!r} is not a choice number")
    query = hellaswag_clean(f"{act}: {ctx_a} {ctx_b.capitalize()}")
    return _choice_doc("hellaswag", i, query, [hellaswag_clean(e) for e in endings], int(label))


def _winogrande(i: int, row: Mapping[str, Any]) -> Doc:
    sentence = _field("winogrande", i, row, "sentence", str)
    options = [_field("winogrande", i, row, k, str) for k in ("option1", "option2")]
    answer = _field("winogrande", i, row, "answer", str)
    if answer not in ("1", "2"):
        raise TaskDataError(f"winogrande row {i}: answer {answer!r}, expected '1' or '2'")
    if sentence.count("_") != 1:
        raise TaskDataError(f"winogrande row {i}: sentence needs exactly one '_' blank: {sentence!r}")
    cut = sentence.index("_")
    rest = sentence[cut + 1 :].strip()
    if not rest:
        raise TaskDataError(f"winogrande row {i}: nothing follows the blank in {sentence!r}")
    contexts = tuple(sentence[:cut] + opt for opt in options)
    return Doc(contexts, (rest, rest), (len(rest), len(rest)), int(answer) - 1)


def _arc(task: str) -> Callable[[int, Mapping[str, Any]], Doc]:
    def fmt(i: int, row: Mapping[str, Any]) -> Doc:
        question = _field(task, i, row, "question", str)
        choices = _field(task, i, row, "choices", dict)
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise TaskDataError(f"{task} row {i}: choices need equal-length 'text' and 'label' lists")
        key = _field(task, i, row, "answerKey", str)
        if key not in labels:
            raise TaskDataError(f"{task} row {i}: answerKey {key!r} not among labels {labels}")
        return _choice_doc(task, i, f"Question: {question}\nAnswer:", texts, labels.index(key))

    return fmt


def _boolq(i: int, row: Mapping[str, Any]) -> Doc:
    passage = _field("boolq", i, row, "passage", str)
    question = _field("boolq", i, row, "question", str)
    answer = _field("boolq", i, row, "answer", (bool, np.bool_))
    return _choice_doc("boolq", i, f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], int(bool(answer)))


FORMATTERS: dict[str, Callable[[int, Mapping[str, Any]], Doc]] = {
    "piqa": _piqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "arc_easy": _arc("arc_easy"),
    "arc_challenge": _arc("arc_challenge"),
    "boolq": _boolq,
}


def load_task(task: str) -> Any:
    """The task's offline validation split (a memory-mapped ``datasets.Dataset``)."""
    if task not in FORMATTERS:
        raise EvaluationError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    import datasets

    from ramp.assets import asset_path

    return datasets.load_from_disk(str(asset_path(task)))


def subset_indices(n_rows: int, n: int | None, seed: int) -> list[int]:
    """``n`` row indices drawn without replacement under ``seed`` (all rows when ``n`` is None or larger)."""
    if n is not None and n < 1:
        raise EvaluationError(f"n_per_task={n} must be >= 1")
    perm = np.random.default_rng(seed).permutation(n_rows)
    return sorted(int(i) for i in (perm if n is None else perm[:n]))


def task_docs(task: str, rows: Any, indices: Sequence[int] | None = None) -> list[Doc]:
    """Format rows (a Dataset or a list of dicts) of ``task``; ``indices`` selects rows and names them in errors."""
    fmt = FORMATTERS.get(task)
    if fmt is None:
        raise EvaluationError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    idx = range(len(rows)) if indices is None else indices
    return [fmt(i, rows[i]) for i in idx]


def _encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation; trailing context spaces move to the continuation (harness rule)."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = encode(context + continuation)
    ctx = encode(context)
    cont = whole[len(ctx) :]
    if not cont:
        raise EvaluationError(f"continuation {continuation!r} encodes to no tokens after context")
    return ctx, cont


@torch.inference_mode()
def choice_loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    max_len: int = 2048,
    pad_id: int = 0,
    desc: str = "loglikelihood",
) -> np.ndarray:
    """Sum of log P(continuation tokens | context tokens) per request (nats), right-padded batches by length."""
    seqs = []
    for ctx, cont in requests:
        full = (ctx + cont)[-(max_len + 1) :]
        seqs.append((full[:-1], len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out = np.zeros(len(seqs), dtype=np.float64)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        ids = order[s : s + batch_size]
        width = max(len(seqs[i][0]) for i in ids)
        batch = torch.full((len(ids), width), pad_id, dtype=torch.long)
        for r, i in enumerate(ids):
            batch[r, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
        # right padding + causal attention: padded positions never influence the scored ones
        logits = model(input_ids=batch).logits
        for r, i in enumerate(ids):
            inp, n_cont = seqs[i]
            # log-softmax only where a continuation token is predicted (the full [B, T, vocab] is large)
            logp = torch.log_softmax(logits[r, len(inp) - n_cont : len(inp)].float(), dim=-1)
            targets = torch.tensor(requests[i][1][-n_cont:])
            out[i] = float(logp.gather(-1, targets.unsqueeze(-1)).double().sum())
    return out


def doc_requests(docs: Sequence[Doc], encode: Callable[[str], list[int]]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of every choice of every document, in document then choice order."""
    return [
        _encode_pair(encode, ctx, " " + cont)
        for d in docs
        for ctx, cont in zip(d.contexts, d.continuations, strict=True)
    ]


def correct_per_doc(docs: Sequence[Doc], ll: np.ndarray) -> tuple[list[bool], list[bool]]:
    """Per document, whether acc and acc_norm pick the gold choice, from the per-choice log-likelihoods ``ll``
    (in :func:`doc_requests` order)."""
    acc, acc_norm = [], []
    start = 0
    for d in docs:
        k = len(d.continuations)
        scores = ll[start : start + k]
        start += k
        acc.append(bool(np.argmax(scores) == d.gold))
        acc_norm.append(bool(np.argmax(scores / np.asarray(d.norm_lengths, dtype=np.float64)) == d.gold))
    return acc, acc_norm


def accuracies(docs: Sequence[Doc], ll: np.ndarray) -> dict[str, float | int]:
    """acc and acc_norm from the per-choice log-likelihoods ``ll`` (in :func:`doc_requests` order)."""
    acc, acc_norm = correct_per_doc(docs, ll)
    n = len(docs)
    return {"acc": sum(acc) / n, "acc_norm": sum(acc_norm) / n, "n": n}


def score_docs(
    model: torch.nn.Module,
    docs: Sequence[Doc],
    encode: Callable[[str], list[int]],
    batch_size: int = 8,
    desc: str = "commonsense",
) -> dict[str, float | int]:
    """acc and acc_norm of ``model`` on formatted documents."""
    return accuracies(docs, choice_loglikelihoods(model, doc_requests(docs, encode), batch_size=batch_size, desc=desc))


def tokenizer_encode(lm: object) -> Callable[[str], list[int]]:
    """Token ids of a text under ``lm``'s tokenizer, without special tokens (no BOS, as the harness does)."""
    tok = getattr(lm, "tokenizer", None)
    if tok is None:
        raise EvaluationError("the model has no tokenizer; pass encode=")
    return lambda text: list(tok(text, add_special_tokens=False).input_ids)


def evaluate_commonsense(
    lm: object,
    tasks: Sequence[str] = TASKS,
    n_per_task: int | None = 200,
    seed: int = 0,
    batch_size: int = 8,
    encode: Callable[[str], list[int]] | None = None,
) -> dict[str, dict[str, float | int]]:
    """``{task: {"acc", "acc_norm", "n"}}`` on seeded subsets of ``n_per_task`` documents per task."""
    unknown = [t for t in tasks if t not in FORMATTERS]
    if unknown:
        raise EvaluationError(f"unknown tasks {unknown}; known tasks: {', '.join(TASKS)}")
    enc = encode or tokenizer_encode(lm)
    model = lm.model if hasattr(lm, "matrices") else lm  # type: ignore[attr-defined]
    out = {}
    for task in tasks:
        rows = load_task(task)
        docs = task_docs(task, rows, subset_indices(len(rows), n_per_task, seed))
        out[task] = score_docs(model, docs, enc, batch_size, desc=task)
        log.info("%s: acc %.3f acc_norm %.3f (n=%d)", task, out[task]["acc"], out[task]["acc_norm"], out[task]["n"])
    return out


def retained(
    quant: Mapping[str, Mapping[str, float]], fp: Mapping[str, Mapping[str, float]], metric: str = "primary"
) -> dict[str, float]:
    """% of FP accuracy retained per task (``PRIMARY_METRIC`` per task by default) and its ``average``."""
    missing = sorted(set(fp) - set(quant))
    if missing:
        raise EvaluationError(f"quantized results lack tasks {missing}")
    out = {}
    for task, f in fp.items():
        m = PRIMARY_METRIC.get(task, "acc") if metric == "primary" else metric
        if f[m] <= 0:
            raise EvaluationError(f"{task}: FP {m} is {f[m]}; cannot express retention")
        out[task] = 100.0 * quant[task][m] / f[m]
    out["average"] = float(np.mean(list(out.values())))
    return out
