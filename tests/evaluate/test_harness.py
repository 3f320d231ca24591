"""Our commonsense scoring against the real lm-evaluation-harness, request by request, on every task."""

import pytest
import torch

from ramp.evaluate.commonsense import TASKS, load_task, subset_indices
from ramp.evaluate.harness import compare_with_harness, write_task_configs
from ramp.evaluate.perplexity import EvaluationError
from ramp.models.loader import gguf_tokenizer
from ramp.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def smollm2_tokenizer_model():
    """A random one-block Llama with SmolLM2's real tokenizer: the prompts, tokenization and scoring are the
    harness's concern, not the weights, and random logits make every choice's log-likelihood distinct."""
    from ramp.assets import asset_path

    lm = tiny_llama(seed=3, hidden=256, intermediate=256, layers=1, heads=2, kv_heads=1, vocab=49152, tied=True)
    lm.tokenizer = gguf_tokenizer(asset_path("smollm2"))
    return lm


def test_every_task_matches_the_harness(smollm2_tokenizer_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    torch.set_num_threads(2)
    indices = {t: subset_indices(len(load_task(t)), 6, seed=0) for t in TASKS}
    out = compare_with_harness(smollm2_tokenizer_model, TASKS, indices, tmp_path, batch_size=4)
    for task, r in out.items():
        assert r["n"] == 6 and r["per_doc_acc_agree"] and r["choices_agree"], (task, r)
        assert r["max_abs_ll_diff"] < 1e-3, (task, r)
        for metric, value in r["harness"].items():
            assert r["ours"][metric] == pytest.approx(value), (task, metric, r)
    assert set(out["hellaswag"]["harness"]) == {"acc", "acc_norm"}


def test_task_configs_name_bad_tasks(tmp_path):
    names = write_task_configs(tmp_path, ["boolq"])
    text = (tmp_path / "boolq" / "boolq_ramp_offline.yaml").read_text()
    assert names == ["boolq_ramp_offline"] and "answer" in text and "super_glue" not in text
    with pytest.raises(EvaluationError, match="'mmlu'"):
        write_task_configs(tmp_path, ["piqa", "mmlu"])
