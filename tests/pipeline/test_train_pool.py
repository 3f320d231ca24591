"""The train stage's pooled and zero-shot runs (train.sources, include_target): source models prepared in workspaces
of their own, one policy trained on them, the pipeline's own model allocated with it and never evaluated."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ramp.allocate import load_policy
from ramp.models.tiny import tiny_llama
from ramp.params import ParamsError, load_pipeline, merge
from ramp.pipeline.run import run_pipeline
from ramp.pipeline.train import source_slug
from ramp.pipeline.workspace import Workspace
from ramp.testbed import train_tokenizer, training_text
from tests.pipeline.harness import TINY

pytestmark = pytest.mark.slow  # two tiny pipelines and a source model prepared: about a minute

REPO = Path(__file__).resolve().parents[2]
TINY_POOL = merge(TINY, {"train": {"rescore_top": 0}})  # rescoring is a single model's (train.sources refuse it)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """Another model family for the pool: a 3-block tiny Llama of another width, as an HF directory."""
    d = tmp_path_factory.mktemp("source") / "tiny3"
    tok = train_tokenizer(training_text(max_chars=200_000), 512)
    lm = tiny_llama(seed=11, hidden=256, intermediate=768, layers=3, vocab=512)
    lm.model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def pool_params(source_dir: Path, include_target: bool, **train):
    overlay = {"train": {"sources": [str(source_dir)], "include_target": include_target, **train}}
    return load_pipeline(REPO / "params.yaml", merge(TINY_POOL, overlay))


def ran(caplog) -> list[str]:
    return [r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("running stage")]


def test_zero_shot_policy_never_evaluates_the_target(tmp_path, source_dir, caplog):
    caplog.set_level(logging.INFO, logger="ramp.pipeline.run")
    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    params = pool_params(source_dir, include_target=False)
    metrics = run_pipeline(params, ws, ("calibrate", "embed", "fold", "sensitivity", "train", "allocate"))
    train = metrics["train"]
    assert train["trained_on"] == [str(source_dir)] and train["zero_shot"] is True
    assert train["target_evaluations"] == 0 and train["evaluations"] > 0
    pool = json.loads((ws.stage("train") / "pool.json").read_text())
    assert list(pool) == [str(source_dir)]  # the target is not a member: nothing was measured on it
    assert not (ws.stage("train") / "best_allocation.json").exists()
    source = ws.root / "cache" / "sources" / source_slug(str(source_dir))
    assert (source / "data" / "fold" / "action_space.parquet").exists()
    assert json.loads((source / "data" / "calibrate" / "model.json").read_text())["path"] == str(source_dir)
    # the target is allocated with the pooled policy, within its own budget
    assert metrics["allocate"]["matrix_bytes"] <= metrics["allocate"]["budget_matrix_bytes"]
    assert metrics["allocate"]["bpw"] <= 4.5
    # the prepared source is reused: another training run (fewer episodes) retrains but prepares nothing
    caplog.clear()
    again = pool_params(source_dir, include_target=False, sac={"episodes": 4}, ensemble=2)
    train = run_pipeline(again, ws, ("train",))["train"]
    assert ran(caplog) == ["train"]
    assert any(r.getMessage() == f"stage calibrate is up to date in {source}" for r in caplog.records)
    # an ensemble of two seeds: both runs' episodes, one policy averaging two actors
    seed = again.seed + again.train.sac.seed
    assert train["ensemble_seeds"] == [seed, seed + 1] and train["episodes"] == 8
    policy = json.loads((ws.stage("train") / "policy" / "policy.json").read_text())
    assert policy["sac"]["hidden"] == 2 * again.train.sac.hidden
    members = [load_policy(ws.stage("train") / "members" / f"seed{s}") for s in (seed, seed + 1)]
    obs = np.random.default_rng(0).standard_normal((20, 14)).astype(np.float32)
    np.testing.assert_allclose(
        load_policy(ws.stage("train") / "policy").actions(obs)[1],
        np.mean([m.actions(obs)[1] for m in members], axis=0),
        rtol=1e-5,
        atol=1e-6,
    )
    pool = json.loads((ws.stage("train") / "pool.json").read_text())[str(source_dir)]
    assert 0 < pool["policy_matches_best"] <= 1  # the averaged walk against the source's best allocation


def test_pool_with_the_target_trains_on_both_under_the_residual_map(tmp_path, source_dir):
    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    # the source calibrates on windows of 64 (the target: 128) and is rewarded on a KLD scale of its own
    overlays = {str(source_dir): {"calibrate": {"n_ctx": 64}, "reward": {"reference": 0.002}}}
    params = pool_params(
        source_dir,
        include_target=True,
        standardize="pooled",
        action_map="residual",
        source_overlays=overlays,
        cost_gain="role",
    )
    metrics = run_pipeline(params, ws, ("calibrate", "embed", "fold", "sensitivity", "train", "allocate"))
    train = metrics["train"]
    assert train["trained_on"] == ["tiny", str(source_dir)] and train["zero_shot"] is False
    source = ws.root / "cache" / "sources" / source_slug(str(source_dir))
    windows = {
        w: json.loads((w / "data" / "metrics" / "calibrate.json").read_text())["n_ctx"] for w in (ws.root, source)
    }
    assert windows == {ws.root: params.calibrate.n_ctx, source: 64}
    # every measured episode's reward is the one of its own model's reference
    history = pd.read_csv(ws.plots / "train_history.csv").dropna(subset=["degradation"])
    pool = json.loads((ws.stage("train") / "pool.json").read_text())
    for name, reference in (("tiny", params.train.reward.reference), (str(source_dir), 0.002)):
        rows = history[(history["model"] == name) & (history["bytes"] <= pool[name]["budget_matrix_bytes"])]
        unused = 1 - rows["bytes"] / pool[name]["budget_matrix_bytes"]
        expected = -np.log1p(rows["degradation"] / reference) - params.train.reward.unused_weight * unused
        assert len(rows) and np.allclose(rows["reward"], expected, rtol=1e-6, atol=1e-9), name
    assert 0 < train["target_evaluations"] < train["evaluations"]
    assert set(train["best_kld_by_model"]) == {"tiny", str(source_dir)}
    policy = json.loads((ws.stage("train") / "policy" / "policy.json").read_text())
    assert policy["standardizer"]["mode"] == "pooled"
    assert (ws.stage("train") / "best_allocation.json").exists()
    # residual: each model's uniform-fill is the prior (one more input); allocate steps from the target's own,
    # with the proxy table as prior whatever the fill
    assert policy["env"]["action_map"] == "residual" and policy["obs_dim"] == 11 + 4
    assert metrics["allocate"]["matrix_bytes"] <= metrics["allocate"]["budget_matrix_bytes"]
    train = {
        "sources": [str(source_dir)],
        "include_target": True,
        "standardize": "pooled",
        "action_map": "residual",
        "cost_gain": "role",
    }
    margin = load_pipeline(REPO / "params.yaml", merge(TINY_POOL, {"train": train, "allocate": {"fill": "margin"}}))
    margin = run_pipeline(margin, ws, ("allocate",))
    assert margin["allocate"]["matrix_bytes"] <= margin["allocate"]["budget_matrix_bytes"]
    # cost gains (train.cost_gain: role): learned from both models' measured tables, kept with the policy, and the
    # prior of the walk (allocate.walk: prior) is the uniform-fill on the proxy priced by them
    from ramp.budget import Budget
    from ramp.knapsack import knapsack_starts
    from ramp.pipeline.allocate import overhead_bytes, resolve_embedding
    from ramp.pipeline.fold import action_space
    from ramp.pipeline.sensitivity import EMBEDDING, embedding_costs
    from ramp.sensitivity import (
        EMBEDDING_ROLE,
        embedding_choice,
        embedding_proxy,
        gained_table,
        legal_embedding_formats,
        predicted_embedding_kld,
        role_gains,
    )

    tables = [
        (
            pd.read_parquet(w / "data" / "sensitivity" / "costs.parquet"),
            pd.read_parquet(w / "data" / "embed" / "embedding.parquet"),
        )
        for w in (ws.root, source)
    ]
    assert (ws.stage("sensitivity") / EMBEDDING).exists() and (source / "data" / "sensitivity" / EMBEDDING).exists()
    embeddings = []  # both models measured their embedding: its gain comes with the matrices' roles
    for w in (ws, Workspace(source)):
        measured = embedding_costs(w)
        embeddings.append((measured, embedding_proxy(w.folded_model(lazy=True), list(measured))))
    gains = role_gains(tables, embeddings)
    assert set(gains) == {"q", "k", "v", "o", "gate", "up", "down", EMBEDDING_ROLE}
    assert set(role_gains(tables)) == set(gains) - {EMBEDDING_ROLE}
    assert policy["cost_gains"] == pytest.approx(gains) and metrics["train"]["cost_gains"] == pytest.approx(gains)
    prior = load_pipeline(REPO / "params.yaml", merge(TINY_POOL, {"train": train, "allocate": {"walk": "prior"}}))
    run_pipeline(prior, ws, ("allocate",))
    slots, proxy = action_space(ws, ws.folded_model(lazy=True))
    budget = json.loads((ws.stage("allocate") / "budget.json").read_text())["budget_matrix_bytes"]
    priced = gained_table(proxy, dict(zip(tables[0][1]["gguf_name"], tables[0][1]["role"], strict=True)), gains)
    expected = knapsack_starts(slots, priced, budget, ["uniform"])["uniform"]
    assert json.loads((ws.stage("allocate") / "allocation.json").read_text()) == expected
    # allocate.embedding_type predicted: the measured choice's rule with no evaluation on the model, the embedding
    # priced by the policy's embedding gain times its proxy error and the matrices by the gained proxy
    lm = ws.folded_model(lazy=True)
    formats = legal_embedding_formats(lm, prior.sensitivity.embedding_formats)
    kld = predicted_embedding_kld(embedding_proxy(lm, formats), gains)
    overheads = {f: overhead_bytes(lm, f, "F32") for f in formats}
    file_bytes = json.loads((ws.root / "data" / "metrics" / "allocate.json").read_text())["file_bytes"]
    file_budget = Budget(file_bytes=file_bytes, where="test")  # the size of the file with the auto embedding
    best, want = embedding_choice(slots, priced, kld, overheads, file_budget)
    on_file = {"walk": "prior", "embedding_type": "predicted", "budget_file_bytes": file_bytes, "budget_bpw": None}
    predicted = merge(TINY_POOL, {"train": train, "allocate": on_file})
    run_pipeline(load_pipeline(REPO / "params.yaml", predicted), ws, ("allocate",))
    got = json.loads((ws.stage("allocate") / "budget.json").read_text())
    assert got["embedding_type"] == best and got["embedding_predicted_kld"] == pytest.approx(want)
    assert got["overhead_bytes"] == overheads[best] and len(want) > 1
    bytes_left = file_budget.resolve(slots, overheads[best]).matrix_bytes
    assert got["budget_matrix_bytes"] == bytes_left
    # a policy without an embedding gain cannot predict: one error, naming what to do
    no_gain = {k: v for k, v in gains.items() if k != EMBEDDING_ROLE}
    with pytest.raises(ValueError, match=r"'predicted': .*'embedding' cost gain.*train.cost_gain role"):
        resolve_embedding(ws, lm, slots, "predicted", file_budget, priced=(priced, no_gain, formats))
    with pytest.raises(ValueError, match="train on a bpw budget"):
        resolve_embedding(ws, lm, slots, "predicted", file_budget)
    # a bpw budget prices the matrices only: predicted is auto there
    auto = resolve_embedding(ws, lm, slots, "auto", Budget(bpw=4.0, where="test"))
    assert resolve_embedding(ws, lm, slots, "predicted", Budget(bpw=4.0, where="test")) == auto
    # train.cost_basis fisher: the embedding's gain is learned on the fold stage's Fisher tables, the policy carries
    # its basis and the prior is the knapsack on the target's Fisher table priced by them (in KLD on every matrix)
    from ramp.pipeline.fold import fisher_costs
    from ramp.pipeline.train import basis_costs
    from ramp.sensitivity import best_knapsack

    on_fisher = {**train, "cost_basis": "fisher", "source_overlays": overlays}  # the source as prepared above
    fisher = load_pipeline(REPO / "params.yaml", merge(TINY_POOL, {"train": on_fisher, "allocate": {"walk": "prior"}}))
    metrics = run_pipeline(fisher, ws, ("train", "allocate"))
    fisher_tables = [
        (basis_costs(c, Workspace(w), "fisher"), e) for (c, e), w in zip(tables, (ws.root, source), strict=True)
    ]
    assert not fisher_tables[0][0]["proxy"].equals(tables[0][0]["proxy"])
    # on the Fisher basis the matrices keep their table as it is (every role's gain 0) and the embedding's gain is its
    # price in KLD itself, averaged over the models
    from ramp.pipeline.train import absolute_embedding_price

    fisher_gains = {role: 0.0 for role in role_gains(fisher_tables) if role != EMBEDDING_ROLE}
    fisher_gains[EMBEDDING_ROLE] = float(np.mean([absolute_embedding_price(*e) for e in embeddings]))
    kld, proxy = embeddings[0]
    assert absolute_embedding_price(kld, proxy) == pytest.approx(np.mean([np.log(kld[f] / proxy[f]) for f in kld]))
    assert metrics["train"]["cost_gains"] == pytest.approx(fisher_gains) and metrics["train"]["cost_basis"] == "fisher"
    policy = load_policy(ws.stage("train") / "policy")
    assert policy.cost_basis == "fisher" and policy.cost_gains == pytest.approx(fisher_gains)
    offered = {(s.gguf_name, f) for s in slots for f in s.formats}
    table = {k: v for k, v in fisher_costs(ws).items() if k in offered}
    roles = dict(zip(tables[0][1]["gguf_name"], tables[0][1]["role"], strict=True))
    budget = json.loads((ws.stage("allocate") / "budget.json").read_text())["budget_matrix_bytes"]
    expected = best_knapsack(slots, gained_table(table, roles, fisher_gains), budget)
    assert json.loads((ws.stage("allocate") / "allocation.json").read_text()) == expected


def test_pool_params_are_checked(source_dir):
    with pytest.raises(ParamsError, match="budget_bpw"):
        load_pipeline(
            REPO / "params.yaml",
            merge(TINY_POOL, {"train": {"sources": [str(source_dir)], "budget_bpw": None, "budget_file_bytes": 10**8}}),
        )
    with pytest.raises(ParamsError, match="include_target"):
        load_pipeline(REPO / "params.yaml", merge(TINY, {"train": {"include_target": False}}))
    with pytest.raises(ParamsError, match="distinct"):
        load_pipeline(REPO / "params.yaml", merge(TINY_POOL, {"train": {"sources": ["gemma3", "gemma3"]}}))
    with pytest.raises(ParamsError, match="ensemble = 2: an ensemble is for pooled runs"):
        load_pipeline(REPO / "params.yaml", merge(TINY, {"train": {"ensemble": 2}}))
    with pytest.raises(ParamsError, match="ensemble"):
        load_pipeline(REPO / "params.yaml", merge(TINY_POOL, {"train": {"sources": ["gemma3"], "ensemble": 0}}))
    with pytest.raises(ParamsError, match="standardize"):
        load_pipeline(REPO / "params.yaml", merge(TINY, {"train": {"standardize": "global"}}))
    with pytest.raises(ParamsError, match="cost_gain = 'role': gains are learned from a pool's tables"):
        load_pipeline(REPO / "params.yaml", merge(TINY, {"train": {"cost_gain": "role"}}))
    with pytest.raises(ParamsError, match=r"cost_gain = 'layer': expected one of \['none', 'role'\]"):
        pool_params(str(source_dir), include_target=True, cost_gain="layer")
    # train.source_overlays: only for listed sources, only the sections that prepare or reward a source
    with pytest.raises(ParamsError, match=r"source_overlays = 'gemma3': not one of train.sources \['testbed'\]"):
        pool_params("testbed", include_target=True, source_overlays={"gemma3": {"calibrate": {"n_ctx": 64}}})
    with pytest.raises(ParamsError, match="source_overlays.testbed: section 'allocate' cannot differ per source"):
        pool_params("testbed", include_target=True, source_overlays={"testbed": {"allocate": {"clip": 3.0}}})
    with pytest.raises(ParamsError, match=r"source_overlays.testbed.calibrate.n_tokens = 1024: must be >= n_ctx=4096"):
        pool_params("testbed", include_target=True, source_overlays={"testbed": {"calibrate": {"n_ctx": 4096}}})
    with pytest.raises(ParamsError, match="source_overlays.testbed.reward.reference: expected a number, got 'x'"):
        pool_params("testbed", include_target=True, source_overlays={"testbed": {"reward": {"reference": "x"}}})


def test_a_source_that_is_the_target_is_refused(tmp_path):
    from ramp.pipeline.train import train

    params = load_pipeline(REPO / "params.yaml", merge(TINY_POOL, {"train": {"sources": ["tiny"]}}))
    with pytest.raises(ValueError, match="'tiny', the pipeline's own model"):
        train(params.train, 0, Workspace(tmp_path / "ws"), pipeline=params)
    assert not (tmp_path / "ws" / "data" / "train").exists()


def test_rescoring_measures_the_best_candidates_on_windows_the_reward_never_saw(tmp_path):
    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    params = load_pipeline(REPO / "params.yaml", merge(TINY, {"train": {"rescore_top": 3, "rescore_windows": 2}}))
    train = run_pipeline(params, ws, ("calibrate", "embed", "fold", "sensitivity", "train"))["train"]
    assert 1 <= len(train["rescored"]) <= 3
    assert train["best_rescored_kld"] == min(r["rescored"] for r in train["rescored"])
    picked = next(r for r in train["rescored"] if r["rescored"] == train["best_rescored_kld"])
    assert train["best_kld"] == picked["degradation"]  # the best allocation is the rescored winner
    # the calibration holds 8 windows of 128 tokens: 2 for the reward, 6 left
    with pytest.raises(ParamsError, match=r"rescore_windows 7 = 9 windows: the calibration has 8 \(calibrate"):
        load_pipeline(REPO / "params.yaml", merge(TINY, {"train": {"rescore_top": 3, "rescore_windows": 7}}))
    with pytest.raises(ParamsError, match="rescore_top"):
        load_pipeline(REPO / "params.yaml", merge(TINY, {"train": {"rescore_top": 2, "sources": ["gemma3"]}}))
