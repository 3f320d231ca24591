"""Scale Folding (SPEC §5): SmoothQuant-style per-input-channel scales folded into the model, exactly.

For a fold group (``ArchSpec.fold_groups``) the targets' input channel j gets

    s_j = max(max|X_j|, EPS)^alpha / max(max|W_:,j|, EPS)^(1 - alpha),   then clamped to [S_MIN, S_MAX]

with max|X_j| from calibration (the largest over the targets, which read the same input) and max|W_:,j| over
the rows of every target. EPS keeps a silent channel or an all-zero column from giving 0 or inf; the clamp
keeps the folded norm weights and matrices within a range fp32 and fp16 block scales handle well. The
targets' columns are multiplied by s and the source absorbs 1/s:

- norm -> q,k,v and norm -> gate,up: the effective norm gain g = w + ``arch.norm_offset`` becomes g / s
  (Gemma stores w with gain 1 + w, so w' = (1 + w) / s - 1). Exact: the targets see (x/s) and multiply by s.
  q_norm/k_norm (Qwen3, Gemma-3) act on the q/k *outputs*, which folding leaves unchanged, so they do not
  break it.
- v -> o: v's output row (g, d) (KV head g, head dim d) is divided by s; every o input column (h, d) of the
  query heads h with h // (n_heads / n_kv) == g is multiplied by the same s. The scale of a tied set is
  computed from the maxima over its columns. Exact because attention mixes v rows linearly per head.
- up -> down: up's output rows are divided by s, down's input columns multiplied by s (SwiGLU/GeGLU output
  act(gate) * up is linear in up). Exact.
A source matrix's bias (Qwen2's v bias) is divided with its rows.

All scales are computed from the pre-fold weights and the calibration statistics, then applied, so the order
of the groups does not matter. The folded model's imatrix for a target is imatrix_j / s_j^2 (its inputs are
X_j / s_j): :func:`folded_imatrix`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ramp.calib import CalibrationStats
from ramp.errors import RampError
from ramp.features import reference_format, weighted_error_terms
from ramp.io import atomic_path, sort_safetensors_metadata
from ramp.models import hf_check
from ramp.models.arch import ARCHS, ArchSpec, FoldGroup
from ramp.models.loader import LoadedModel, MatrixInfo, ModelLoadError, model_from_state
from ramp.models.sanity import finite_number
from ramp.models.stream import (
    SafetensorsStore,
    decoder_layers,
    layer_prefix,
    loaded,
    skeleton,
    write_safetensors,
)

log = logging.getLogger(__name__)

EPS = 1e-5  # floor of max|X_j| and max|W_:,j| before the power
S_MIN, S_MAX = 1e-4, 1e4  # clamp of the folded scales


class FoldingError(RampError, ValueError):
    """A fold that cannot be done exactly or with the given inputs (the message names what and why)."""


@dataclass
class FoldResult:
    """What :func:`fold_model` did.

    ``scales``: target gguf_name -> float32[cols] input-column scales s (columns were multiplied by s).
    ``report``: one row per group (block, group, targets, s_min, s_max, s_median, err_before, err_after: the
    mean imatrix-weighted relative error at the reference format over the matrices the group changes).
    ``matrix_report``: one row per quantizable matrix (gguf_name, role, ref_format, err_before, err_after).
    """

    alpha: float
    scales: dict[str, np.ndarray]
    report: pd.DataFrame
    matrix_report: pd.DataFrame = field(default_factory=pd.DataFrame)


def group_label(group: FoldGroup) -> str:
    return f"{group.source}->{','.join(group.targets)}"


def _tie_index(lm: LoadedModel, group: FoldGroup, cols: int) -> torch.Tensor:
    """For each target input column, the index of the source row (or norm channel) it is tied to."""
    if group.source != "v":
        return torch.arange(cols)
    cfg = lm.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if cols != n_heads * head_dim or n_heads % n_kv:
        raise FoldingError(
            f"v -> o fold needs o with n_heads*head_dim = {n_heads}*{head_dim} input columns and n_heads divisible "
            f"by n_kv={n_kv}; o has {cols} columns"
        )
    heads = torch.arange(n_heads).repeat_interleave(head_dim)
    dims = torch.arange(head_dim).repeat(n_heads)
    return (heads // (n_heads // n_kv)) * head_dim + dims


def _scales_for(
    lm: LoadedModel, stats: CalibrationStats, block: int, group: FoldGroup, alpha: float, params: dict
) -> tuple[torch.Tensor, torch.Tensor, list[MatrixInfo]]:
    """(target column scales [cols], source scales [n_source], target matrices) of one group in one block."""
    by_role = {m.role: m for m in lm.matrices() if m.block == block}
    targets = [by_role[r] for r in group.targets]
    cols = {m.shape[1] for m in targets}
    if len(cols) != 1:
        raise FoldingError(f"block {block} {group_label(group)}: targets have different column counts {cols}")
    (n_cols,) = cols
    x_max = torch.zeros(n_cols, dtype=torch.float64)
    w_max = torch.zeros(n_cols, dtype=torch.float64)
    for m in targets:
        if m.gguf_name not in stats.max_abs:
            raise FoldingError(f"no calibration statistics for {m.gguf_name}")
        x_max = torch.maximum(x_max, torch.as_tensor(stats.max_abs[m.gguf_name], dtype=torch.float64))
        w_max = torch.maximum(w_max, params[m.hf_name].detach().abs().amax(0).double())
    tie = _tie_index(lm, group, n_cols)
    n_src = int(tie.max()) + 1
    x_src = torch.zeros(n_src, dtype=torch.float64).scatter_reduce(0, tie, x_max, "amax")
    w_src = torch.zeros(n_src, dtype=torch.float64).scatter_reduce(0, tie, w_max, "amax")
    s_src = (x_src.clamp_min(EPS) ** alpha / w_src.clamp_min(EPS) ** (1 - alpha)).clamp(S_MIN, S_MAX)
    return s_src[tie], s_src, targets


def _source_param(lm: LoadedModel, block: int, group: FoldGroup) -> tuple[str, str]:
    """(kind, hf parameter name) of a group's source: ("norm", ...) or ("matrix", ...)."""
    if group.source in lm.arch.block_norms:
        return "norm", lm.arch.block_norms[group.source].at(block).hf
    if group.source in lm.arch.matrices:
        return "matrix", lm.arch.matrices[group.source].at(block).hf
    raise FoldingError(
        f"fold source {group.source!r} is neither a norm ({sorted(lm.arch.block_norms)}) nor a matrix role "
        f"of architecture {lm.arch.gguf_arch}"
    )


def _matrix_errors(
    matrices: list[MatrixInfo], params: dict, imatrix: dict[str, np.ndarray]
) -> dict[str, tuple[float, str]]:
    out = {}
    for m in matrices:
        fmt = reference_format(m.shape)
        num, den = weighted_error_terms(params[m.hf_name], imatrix[m.gguf_name], fmt)
        out[m.gguf_name] = (num / den, fmt)
    return out


def _fold_blocks(
    lm: LoadedModel, stats: CalibrationStats, alpha: float, groups: tuple[FoldGroup, ...], errors: bool, out: dict
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Fold block after block; yields (block, its folded parameters by full name) while they are in memory.

    A lazy model (``lm.store``) has one block's weights read at a time (:func:`ramp.models.stream.loaded`), so
    the yielded tensors are valid until the next step. Within a block every scale is computed from the pre-fold
    weights before any is applied, as the groups of one block share matrices (v is a target of norm -> q,k,v and
    the source of v -> o); blocks share none. ``out`` collects the plan rows, scales and errors.
    """
    imatrix = stats.imatrix()
    prefix = layer_prefix(lm.model)
    layers = decoder_layers(lm.model)
    matrices = lm.matrices()
    plan, scales, before, after, touched = out["plan"], out["scales"], out["before"], out["after"], out["touched"]
    for block in tqdm(range(lm.config.num_hidden_layers), desc="fold", unit="block", leave=False):
        with loaded(lm.model, f"{prefix}.{block}", layers[block], lm.store):
            params = {f"{prefix}.{block}.{n}": p for n, p in layers[block].named_parameters()}
            mats = [m for m in matrices if m.block == block]
            if errors:
                before.update(_matrix_errors(mats, params, imatrix))
            steps = []
            for group in groups:
                s_cols, s_src, targets = _scales_for(lm, stats, block, group, alpha, params)
                kind, src_name = _source_param(lm, block, group)
                steps.append((block, group, s_cols, s_src, targets, kind, src_name))
            for _, group, s_cols, s_src, targets, kind, src_name in steps:
                _apply(lm, block, group, s_cols, s_src, targets, kind, src_name, params, scales, touched)
            plan.extend(steps)
            if errors:
                folded = folded_imatrix({m.gguf_name: imatrix[m.gguf_name] for m in mats}, _only(scales, mats))
                after.update(_matrix_errors(mats, params, folded))
            yield block, params


def _only(scales: dict[str, np.ndarray], mats: list[MatrixInfo]) -> dict[str, np.ndarray]:
    names = {m.gguf_name for m in mats}
    return {k: v for k, v in scales.items() if k in names}


def _apply(
    lm: LoadedModel,
    block: int,
    group: FoldGroup,
    s_cols: torch.Tensor,
    s_src: torch.Tensor,
    targets: list[MatrixInfo],
    kind: str,
    src_name: str,
    params: dict,
    scales: dict[str, np.ndarray],
    touched: dict[tuple[int, str], list[str]],
) -> None:
    """Multiply the targets' columns by ``s_cols`` and divide the source by ``s_src`` (in place)."""
    for m in targets:
        w = params[m.hf_name]
        w.mul_(s_cols.to(w.dtype).unsqueeze(0))
        if m.gguf_name in scales:
            raise FoldingError(f"{m.gguf_name} is a target of two fold groups; its scales would compound")
        scales[m.gguf_name] = s_cols.numpy().astype(np.float32)
    src = params[src_name]
    if src.shape[0] != s_src.numel():
        raise FoldingError(f"{src_name}: {src.shape[0]} rows/channels, but the group has {s_src.numel()} scales")
    if kind == "norm":
        off = lm.arch.norm_offset
        src.copy_(((src.double() + off) / s_src - off).to(src.dtype))
    else:
        src.copy_((src.double() / s_src.unsqueeze(1)).to(src.dtype))
        bias = params.get(src_name.removesuffix(".weight") + ".bias")
        if bias is not None:
            bias.copy_((bias.double() / s_src).to(bias.dtype))
    names = [m.gguf_name for m in targets]
    if kind == "matrix":
        names.append(lm.arch.matrices[group.source].at(block).gguf)
    touched[(block, group_label(group))] = names


def _check_fold_args(lm: LoadedModel, alpha: float, groups: tuple[FoldGroup, ...] | None) -> tuple[FoldGroup, ...]:
    if not 0.0 <= alpha <= 1.0:
        raise FoldingError(f"migration strength alpha={alpha} must lie in [0, 1]")
    groups = lm.arch.fold_groups if groups is None else groups
    if not groups:
        raise FoldingError(f"architecture {lm.arch.gguf_arch} has no fold groups; nothing to fold")
    return groups


def _result(lm: LoadedModel, alpha: float, errors: bool, out: dict) -> FoldResult:
    before, after = out["before"], out["after"]
    rows = []
    for block, group, s_cols, _s_src, targets, _kind, _src in out["plan"]:
        names = out["touched"][(block, group_label(group))]
        rows.append(
            {
                "block": block,
                "group": group_label(group),
                "targets": ",".join(m.gguf_name for m in targets),
                "s_min": float(s_cols.min()),
                "s_max": float(s_cols.max()),
                "s_median": float(s_cols.median()),
                "err_before": float(np.mean([before[n][0] for n in names])) if errors else float("nan"),
                "err_after": float(np.mean([after[n][0] for n in names])) if errors else float("nan"),
            }
        )
    mrows = [
        {
            "gguf_name": m.gguf_name,
            "block": m.block,
            "role": m.role,
            "ref_format": before[m.gguf_name][1],
            "err_before": before[m.gguf_name][0],
            "err_after": after[m.gguf_name][0],
        }
        for m in lm.matrices()
        if errors
    ]
    log.info("folded %d groups (alpha=%.2f) of %s", len(out["plan"]), alpha, lm.source)
    return FoldResult(alpha, out["scales"], pd.DataFrame(rows), pd.DataFrame(mrows))


def _empty_out() -> dict:
    return {"plan": [], "scales": {}, "before": {}, "after": {}, "touched": {}}


@torch.no_grad()
def fold_model(
    lm: LoadedModel,
    stats: CalibrationStats,
    alpha: float = 0.5,
    groups: tuple[FoldGroup, ...] | None = None,
    errors: bool = True,
) -> FoldResult:
    """Fold SmoothQuant scales into ``lm`` in place (SPEC §5); ``groups`` default to ``lm.arch.fold_groups``.

    ``alpha`` in [0, 1] is the migration strength. With ``errors`` the report carries the weighted relative
    quantization error at the reference format before and after (costs two quantization passes). A lazy model
    cannot be folded in place: :func:`fold_to_file` streams it.
    """
    groups = _check_fold_args(lm, alpha, groups)
    if lm.store is not None:
        raise FoldingError(f"{lm.source}: a lazily loaded model is folded block by block with fold_to_file")
    out = _empty_out()
    for _ in _fold_blocks(lm, stats, alpha, groups, errors, out):
        pass
    return _result(lm, alpha, errors, out)


@torch.no_grad()
def fold_to_file(
    lm: LoadedModel,
    stats: CalibrationStats,
    path: str | Path,
    alpha: float = 0.5,
    groups: tuple[FoldGroup, ...] | None = None,
    errors: bool = True,
    extra: dict[str, Any] | None = None,
    source: str | None = None,
) -> FoldResult:
    """Fold ``lm`` block by block into the safetensors file ``path`` (what :func:`save_folded` writes for a folded
    model, loadable by :func:`load_folded`), one block's fp32 weights in memory at a time for a lazy model; the
    same folded values as :func:`fold_model`. The embeddings, final norm and LM head are copied unchanged."""
    groups = _check_fold_args(lm, alpha, groups)
    source = str(lm.source) if source is None else source
    state = lm.model.state_dict(keep_vars=True)
    names = _state_names(lm, state)
    prefix = layer_prefix(lm.model)
    n_blocks = lm.config.num_hidden_layers
    per_block = [[n for n in names if n.startswith(f"{prefix}.{b}.")] for b in range(n_blocks)]
    rest = [n for n in names if not n.startswith(f"{prefix}.")]
    order = rest + [n for block in per_block for n in block]
    out = _empty_out()

    def arrays() -> Iterator[tuple[str, np.ndarray]]:
        for n in rest:
            yield n, _fp32(lm, state[n], n)
        for block, params in _fold_blocks(lm, stats, alpha, groups, errors, out):
            for n in per_block[block]:
                if n not in params:
                    raise FoldingError(f"{lm.source}: {n} is not a parameter of decoder block {block}")
                yield n, params[n].detach().to(torch.float32).contiguous().numpy()

    specs = [(n, np.dtype(np.float32), tuple(state[n].shape)) for n in order]
    write_safetensors(Path(path), specs, arrays(), metadata=_folded_meta(lm, extra, source))
    return _result(lm, alpha, errors, out)


def _state_names(lm: LoadedModel, state: dict[str, torch.Tensor]) -> list[str]:
    """The model's state names in state_dict order, a tied LM head once (as the token embedding)."""
    names = list(state)
    if getattr(lm.config, "tie_word_embeddings", False) and "lm_head.weight" in names:
        names.remove("lm_head.weight")
    return names


def _fp32(lm: LoadedModel, t: torch.Tensor, name: str) -> np.ndarray:
    """``lm``'s unchanged tensor ``t`` (named ``name``) as float32, read from its store for a lazy model."""
    if t.is_meta:
        t = lm.store.read(name)  # type: ignore[union-attr]
    return t.detach().to(torch.float32).contiguous().numpy()


def folded_imatrix(imatrix: dict[str, np.ndarray], scales: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The folded model's imatrix: imatrix_j / s_j^2 for every scaled matrix, the others unchanged (float32)."""
    unknown = sorted(set(scales) - set(imatrix))
    if unknown:
        raise FoldingError(f"scales for matrices missing from the imatrix: {unknown[:5]}")
    out = {}
    for name, im in imatrix.items():
        im = np.asarray(im, dtype=np.float64)
        if name in scales:
            s = np.asarray(scales[name], dtype=np.float64)
            if s.shape != im.shape:
                raise FoldingError(f"{name}: scales have shape {s.shape}, imatrix {im.shape}")
            im = im / (s * s)
        out[name] = im.astype(np.float32)
    return out


def save_folded(
    lm: LoadedModel, path: str | Path, extra: dict[str, Any] | None = None, source: str | None = None
) -> Path:
    """Write the (folded) model's weights as safetensors, atomically, with its config in the metadata.

    A tied LM head is stored once (as the token embedding). ``source`` (default ``lm.source``) is recorded as
    where the model came from, also as the config's ``_name_or_path`` instead of the folder it was loaded from;
    with a source that does not depend on where the files are, the same model gives the same bytes.
    """
    path = Path(path)
    source = str(lm.source) if source is None else source
    state = lm.model.state_dict()
    seen: dict[int, str] = {}
    tensors = {}
    for name, t in state.items():
        key = t.data_ptr()
        if key in seen:  # tied weights share storage; safetensors refuses duplicates
            continue
        seen[key] = name
        tensors[name] = t.detach().to(torch.float32).contiguous().cpu()
    meta = _folded_meta(lm, extra, source)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        sort_safetensors_metadata(tmp)  # the writer orders metadata keys differently in every process
    return path


def _folded_meta(lm: LoadedModel, extra: dict[str, Any] | None, source: str) -> dict[str, str]:
    config = json.loads(lm.config.to_json_string(use_diff=False))
    config["_name_or_path"] = source
    return {
        "ramp.config": json.dumps(config, indent=2, sort_keys=True) + "\n",
        "ramp.arch": lm.arch.gguf_arch,
        "ramp.source": source,
        "ramp.extra": json.dumps(extra or {}, sort_keys=True),
    }


IGNORED_CONFIG_KEYS = ("_name_or_path", "transformers_version")  # differ between runs, describe nothing


def _folded_config(path: Path, meta: dict[str, str]) -> tuple[Any, ArchSpec]:
    """The config and architecture in a folded file's metadata, checked as a Hugging Face config is."""
    missing = [k for k in ("ramp.config", "ramp.arch") if k not in meta]
    if missing:
        raise FoldingError(f"{path}: not a RAMP folded model (metadata lacks {', '.join(missing)})")
    if meta["ramp.arch"] not in ARCHS:
        raise FoldingError(f"{path}: metadata ramp.arch = {meta['ramp.arch']!r}; expected one of {sorted(ARCHS)}")
    source = f"{path} metadata ramp.config"
    config, arch = hf_check.config_from_dict(
        hf_check.parse_json_object(meta["ramp.config"], source, FoldingError), source, FoldingError
    )
    if arch.gguf_arch != meta["ramp.arch"]:
        raise FoldingError(
            f"{path}: metadata ramp.arch = {meta['ramp.arch']!r}, but the config is a {arch.gguf_arch} model"
        )
    if "ramp.extra" in meta:
        extra = hf_check.parse_json_object(meta["ramp.extra"], f"{path} metadata ramp.extra", FoldingError)
        alpha = extra.get("alpha", 0.0)
        if not finite_number(alpha) or not 0.0 <= alpha <= 1.0:
            raise FoldingError(f"{path}: metadata ramp.extra alpha = {alpha!r}; expected a number in [0, 1]")
        if not isinstance(extra.get("enabled", True), bool):
            raise FoldingError(f"{path}: metadata ramp.extra enabled = {extra['enabled']!r}; expected true or false")
    return config, arch


def _check_against_base(path: Path, config: Any, arch: ArchSpec, base: LoadedModel) -> None:
    """Folding changes weights only: the folded file must describe the base model's architecture and config."""
    if base.arch.gguf_arch != arch.gguf_arch:
        raise FoldingError(f"{path}: folded {arch.gguf_arch} model, base is {base.arch.gguf_arch}")
    ours, theirs = config.to_dict(), base.config.to_dict()
    for key in sorted((set(ours) | set(theirs)) - set(IGNORED_CONFIG_KEYS)):
        if ours.get(key) != theirs.get(key):
            raise FoldingError(
                f"{path}: config {key} = {ours.get(key)!r}, the base model {base.source} has {theirs.get(key)!r}"
            )


def load_folded(path: str | Path, base: LoadedModel | None = None, lazy: bool = False) -> LoadedModel:
    """Load what :func:`save_folded` wrote, checked: metadata JSON types and ranges, every tensor's name, shape
    and dtype against the model the stored config describes, finite weights, and (with ``base``, the model it
    was folded from) the same architecture and config as the base. With ``base`` the tokenizer and GGUF
    metadata are taken from it, so the result exports like the original."""
    path = Path(path)
    if not path.is_file():
        raise FoldingError(f"{path}: no such folded model file")
    headers, (meta,) = hf_check.read_headers([path], FoldingError)
    config, arch = _folded_config(path, meta)
    if base is not None:
        _check_against_base(path, config, arch, base)
    hf_check.check_headers(headers, config, str(path), FoldingError)
    store = None
    if lazy:  # weights read per tensor when used (ramp.models.stream), each checked finite then
        store = SafetensorsStore([path], error=FoldingError)
        model = skeleton(config)
    else:
        state = hf_check.load_tensors(headers, FoldingError)
        hf_check.check_tied_head(state, config, str(path), FoldingError)
        try:
            model = model_from_state(config, state, f"{path}: tensors missing")
        except ModelLoadError as e:
            raise FoldingError(str(e)) from e
    if base is not None:
        return LoadedModel(
            model, base.tokenizer, arch, base.source, dict(base.gguf_metadata), dict(base.gguf_types), store=store
        )
    source = meta.get("ramp.source", str(path))
    return LoadedModel(model, None, arch, Path(source) if source else path, store=store)
