"""Commonsense zero-shot scoring: harness formatting on real rows, batched log-likelihoods, bad rows, SmolLM2."""

import numpy as np
import pytest
import torch

from ramp.evaluate.commonsense import (
    CHANCE,
    TASKS,
    Doc,
    TaskDataError,
    choice_loglikelihoods,
    evaluate_commonsense,
    hellaswag_clean,
    load_task,
    retained,
    score_docs,
    subset_indices,
    task_docs,
)
from ramp.evaluate.perplexity import EvaluationError
from ramp.models.tiny import tiny_llama


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_formatting_on_real_rows():
    (piqa,) = task_docs("piqa", load_task("piqa"), [0])
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.continuations[1].startswith("Provide the guinea pig") and piqa.gold == 0
    (hs,) = task_docs("hellaswag", load_task("hellaswag"), [0])
    assert hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.continuations[3] == "starts pulling up roofing on a roof." and hs.gold == 3
    (wg,) = task_docs("winogrande", load_task("winogrande"), [0])
    assert wg.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert wg.continuations == ("always got the easier cases.",) * 2 and wg.gold == 1
    arc_rows = load_task("arc_easy")
    (arc,) = task_docs("arc_easy", arc_rows, [0])
    assert arc.contexts[0] == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.continuations == ("cellular telephone", "television", "refrigerator", "airplane") and arc.gold == 0
    # some ARC rows use "1".."4" as labels and keys
    numeric = [i for i in range(len(arc_rows)) if arc_rows[i]["answerKey"].isdigit()]
    assert numeric
    (arc_num,) = task_docs("arc_easy", arc_rows, numeric[:1])
    row = arc_rows[numeric[0]]
    assert arc_num.gold == row["choices"]["label"].index(row["answerKey"])
    boolq_rows = load_task("boolq")
    (bq,) = task_docs("boolq", boolq_rows, [0])
    assert bq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert bq.continuations == ("no", "yes") and bq.gold == 0
    # every row of every task formats (no malformed rows in the shipped data)
    for task in TASKS:
        rows = load_task(task)
        assert len(task_docs(task, rows)) == len(rows)


def test_hellaswag_markup_and_acc_norm_lengths():
    assert hellaswag_clean(" [header] How to cook rice [title] Rinse the rice. [step] Then boil.") == (
        " How to cook rice. Rinse the rice. Then boil."  # the harness strips before removing tags
    )
    (hs,) = task_docs("hellaswag", load_task("hellaswag"), [0])
    assert hs.norm_lengths == tuple(len(c) for c in hs.continuations)


@pytest.mark.parametrize(
    "task,row,match",
    [
        ("piqa", {"goal": "g", "sol1": "a", "sol2": "b"}, "piqa row 7: missing field 'label'"),
        (
            "hellaswag",
            {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": "5"},
            "gold index 5",
        ),
        ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}, "exactly one '_'"),
        ("winogrande", {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "3"}, "answer '3'"),
        (
            "arc_easy",
            {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
            "answerKey 'E'",
        ),
        ("boolq", {"question": "q", "passage": "p", "answer": "yes"}, "field 'answer' is str"),
    ],
)
def test_malformed_rows_name_task_and_row(task, row, match):
    with pytest.raises(TaskDataError, match=match) as e:
        task_docs(task, {7: row}, [7])
    assert f"{task} row 7" in str(e.value)


def test_batched_padded_loglikelihoods_equal_one_by_one():
    lm = tiny_llama(seed=0)
    reqs = [
        (byte_encode("Question: a b c\nAnswer:"), byte_encode(" yes")),
        (byte_encode("xy"), byte_encode(" a long tail")),
    ]
    reqs += [(byte_encode("z" * n), byte_encode(" q")) for n in (3, 40, 17)]
    batched = choice_loglikelihoods(lm.model, reqs, batch_size=4)
    single = choice_loglikelihoods(lm.model, reqs, batch_size=1)
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)
    # and equal to a direct computation
    ctx, cont = reqs[1]
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0], -1)
    direct = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
    assert batched[1] == pytest.approx(direct, abs=1e-3)


def test_scoring_acc_and_acc_norm_on_a_tiny_model():
    lm = tiny_llama(seed=0)
    ctx, short, long = "Question: x\nAnswer:", "ab", "abcdefghijklmnopqrstuvwxyz"
    ll = choice_loglikelihoods(lm.model, [(byte_encode(ctx), byte_encode(" " + c)) for c in (short, long)])
    assert ll[0] > ll[1]  # more characters, lower total log-likelihood ...
    assert ll[0] / len(short) < ll[1] / len(long)  # ... but higher per character on this model
    docs = [Doc((ctx, ctx), (short, long), (len(short), len(long)), gold) for gold in (0, 1)]
    res = score_docs(lm.model, docs, byte_encode, batch_size=3)
    assert res == {"acc": 0.5, "acc_norm": 0.5, "n": 2}
    only_short = score_docs(lm.model, docs[:1], byte_encode)
    assert only_short == {"acc": 1.0, "acc_norm": 0.0, "n": 1}
    out = evaluate_commonsense(lm, TASKS, n_per_task=3, seed=1, encode=byte_encode)
    assert set(out) == set(TASKS) and all(v["n"] == 3 for v in out.values())
    assert out == evaluate_commonsense(lm, TASKS, n_per_task=3, seed=1, encode=byte_encode)


def test_subsets_retention_and_errors():
    a, b = subset_indices(100, 10, 0), subset_indices(100, 10, 0)
    assert a == b and len(set(a)) == 10 and a != subset_indices(100, 10, 1)
    assert subset_indices(5, 50, 0) == [0, 1, 2, 3, 4]
    fp = {"piqa": {"acc": 0.6, "acc_norm": 0.64}, "winogrande": {"acc": 0.5, "acc_norm": 0.5}}
    q = {"piqa": {"acc": 0.6, "acc_norm": 0.48}, "winogrande": {"acc": 0.5, "acc_norm": 0.5}}
    r = retained(q, fp)
    assert r == {"piqa": 75.0, "winogrande": 100.0, "average": 87.5}
    with pytest.raises(EvaluationError, match="lack tasks"):
        retained({"piqa": q["piqa"]}, fp)
    with pytest.raises(EvaluationError, match="unknown tasks"):
        evaluate_commonsense(tiny_llama(seed=0), ["mmlu"], 5, 0, encode=byte_encode)
    with pytest.raises(EvaluationError, match="no tokenizer"):
        evaluate_commonsense(tiny_llama(seed=0), ["piqa"], 5, 0)


@pytest.mark.slow
def test_smollm2_fp_accuracy_above_chance():
    """The 4-choice tasks, where chance is 25 %. (WinoGrande and BoolQ sit at or below chance for this 135M
    model, under our scorer and under lm-evaluation-harness alike: test_harness.py holds the two together.)"""
    from ramp.assets import asset_path
    from ramp.models.loader import load_model

    torch.set_num_threads(2)
    lm = load_model(asset_path("smollm2"))
    out = evaluate_commonsense(lm, ("arc_easy", "hellaswag"), n_per_task=40, seed=0)
    print(out)
    assert all(res["n"] == 40 for res in out.values())
    # Measured with this seed: HellaSwag acc 0.35 / acc_norm 0.275 (published ~0.41 acc_norm: see issue 6 note)
    assert out["arc_easy"]["acc_norm"] > CHANCE["arc_easy"] + 0.08, out
    assert out["hellaswag"]["acc"] > CHANCE["hellaswag"] + 0.05, out
