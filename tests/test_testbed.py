"""The testbed model: deterministic training, loss goes down, the output loads and every format is legal."""

from __future__ import annotations

import json

import pytest

from ramp.allocation import slots_for
from ramp.assets import asset_path
from ramp.data import wiki_split
from ramp.formats import QUANT_CHOICES
from ramp.models.loader import load_model
from ramp.testbed import TestbedConfig, TestbedError, train, training_text

TINY = TestbedConfig(
    hidden=256,
    intermediate=256,
    layers=1,
    heads=4,
    kv_heads=2,
    vocab=512,
    n_ctx=64,
    batch_size=4,
    steps=20,
    warmup_steps=2,
    lr=3e-3,
    text_chars=100_000,
)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    text = training_text(TINY.text_chars)
    logs = [train(TINY, root / name, text=text) for name in ("a", "b")]
    return root, logs


def test_same_seed_same_weight_bytes(two_runs):
    root, logs = two_runs
    assert (root / "a" / "model.safetensors").read_bytes() == (root / "b" / "model.safetensors").read_bytes()
    assert logs[0]["losses"] == logs[1]["losses"]
    other = train(TestbedConfig(**{**TINY.to_dict(), "seed": 1}), root / "c", text=training_text(TINY.text_chars))
    assert (root / "c" / "model.safetensors").read_bytes() != (root / "a" / "model.safetensors").read_bytes()
    assert other["losses"] != logs[0]["losses"]


def test_loss_decreases(two_runs):
    losses = two_runs[1][0]["losses"]
    assert len(losses) == TINY.steps
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.5  # nats per token


def test_output_loads_and_every_format_is_legal(two_runs):
    root, _ = two_runs
    lm = load_model(root / "a")
    assert lm.config.model_type == "llama"
    assert lm.config.hidden_size % 256 == 0 and lm.config.intermediate_size % 256 == 0
    assert lm.config.vocab_size % 256 == 0
    assert lm.config.hidden_size // lm.config.num_attention_heads == 64
    for s in slots_for(lm.matrices()):
        assert set(s.formats) == set(QUANT_CHOICES), s.gguf_name
    ids = lm.tokenizer("The cat sat.").input_ids
    assert ids[0] == lm.tokenizer.bos_token_id == 1
    assert lm.tokenizer.decode(ids[1:]) == "The cat sat."
    log = json.loads((root / "a" / "train_log.json").read_text())
    assert log["config_hash"] == TINY.hash()


def test_training_text_excludes_the_evaluation_split():
    text = training_text()
    _, eval_text = wiki_split(asset_path("wiki"))
    docs = [d for d in eval_text.split("\n\n") if len(d) > 200]
    assert docs
    assert not any(d[:200] in text for d in docs[::10])


def test_bad_configs_raise():
    with pytest.raises(TestbedError, match="hidden=320 must be a multiple of 256"):
        TestbedConfig(hidden=320)
    with pytest.raises(TestbedError, match="kv_heads"):
        TestbedConfig(heads=4, kv_heads=3)
    assert TestbedConfig().hash() != TestbedConfig(seed=1).hash()
    assert TestbedConfig().hash() == TestbedConfig().hash()
