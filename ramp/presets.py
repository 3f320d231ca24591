"""llama.cpp's presets and uniform types (with its shape fallbacks) as per-tensor types: a reproduction of
``llama-quantize``'s rules (src/llama-quant.cpp),
checked against the real tool in tests/test_baselines.py, and the matrices' part of them as an allocation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ramp.allocation import Allocation, AllocationError, Slot, validate
from ramp.formats import QUANT_CHOICES, get_format
from ramp.params import EMBEDDING_AUTO

# llama.cpp's fallback when a 256-block type does not fit the row length (tensor_type_fallback in
# src/llama-quant.cpp): the 32-block type it silently substitutes. RAMP records it explicitly instead.
KQUANT_FALLBACK: dict[str, str] = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


@dataclass(frozen=True)
class _RuleContext:
    i: int  # index of this tensor among its kind (= block index for a dense model)
    n: int  # number of such tensors (attn_v) or blocks (ffn_*)
    gqa: int  # n_head / n_head_kv
    imatrix: bool


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


Rule = Callable[[_RuleContext], str | None]  # None: keep the preset's default type

# preset -> (default type, role -> rule) for a dense Llama-family model (no experts, not Falcon, not 70B);
# role names are ramp.models.arch.ROLES. Derived from llama_tensor_get_type_impl in src/llama-quant.cpp.
LLAMA_PRESETS: dict[str, tuple[str, dict[str, Rule]]] = {
    "Q2_K": (
        "Q2_K",
        {
            "v": lambda c: "Q4_K" if c.gqa >= 4 else "Q3_K",
            "down": lambda c: "Q3_K",
            "o": lambda c: "Q3_K",
        },
    ),
    "Q3_K_S": ("Q3_K", {}),
    "Q3_K_M": (
        "Q3_K",
        {
            "v": lambda c: "Q5_K" if c.i < 2 else "Q4_K",
            "down": lambda c: "Q5_K" if c.i < c.n // 16 else "Q4_K",
            "o": lambda c: "Q4_K",
        },
    ),
    "Q3_K_L": ("Q3_K", {"v": lambda c: "Q5_K", "down": lambda c: "Q5_K", "o": lambda c: "Q5_K"}),
    "Q4_0": ("Q4_0", {"down": lambda c: "Q4_1" if c.imatrix and c.i < c.n // 8 else None}),
    "Q4_1": ("Q4_1", {}),
    "Q5_0": ("Q5_0", {"down": lambda c: "Q5_1" if c.imatrix and c.i < c.n // 8 else None}),
    "Q5_1": ("Q5_1", {}),
    "IQ4_NL": (
        "IQ4_NL",
        {
            "v": lambda c: "Q5_K" if c.gqa >= 4 else None,
            "down": lambda c: "Q5_K" if c.i < c.n // 8 and not c.imatrix else None,
        },
    ),
    "Q4_K_S": (
        "Q4_K",
        {
            "v": lambda c: "Q5_K" if c.i < 4 else None,
            "down": lambda c: "Q5_K" if c.i < c.n // 8 else None,
        },
    ),
    "Q4_K_M": (
        "Q4_K",
        {
            "v": lambda c: "Q6_K" if _more_bits(c.i, c.n) else None,
            "down": lambda c: "Q6_K" if _more_bits(c.i, c.n) else None,
        },
    ),
    "Q5_K_S": ("Q5_K", {}),
    "Q5_K_M": (
        "Q5_K",
        {
            "v": lambda c: "Q6_K" if _more_bits(c.i, c.n) else None,
            "down": lambda c: "Q6_K" if _more_bits(c.i, c.n) else None,
        },
    ),
    "Q6_K": ("Q6_K", {}),
    "Q8_0": ("Q8_0", {}),
}


def _fallback(fmt: str, cols: int) -> str:
    """llama.cpp's shape fallback: a type whose block does not divide the row length is replaced."""
    if cols % get_format(fmt).block_size == 0:
        return fmt
    fb = KQUANT_FALLBACK.get(fmt, fmt)
    return fb if cols % get_format(fb).block_size == 0 else "F16"


def _output_type(default: str, cols: int) -> str:
    """Type of ``output.weight`` (or of a tied ``token_embd.weight``) before the shape fallback."""
    if cols % get_format(default).block_size:
        return "Q8_0"
    return default if default == "Q8_0" else "Q6_K"


def auto_embedding_type(cols: int) -> str:
    """llama-quantize's type for ``output.weight`` (or a tied ``token_embd.weight``) of rows of ``cols`` values in its
    K-quant presets: Q6_K, or Q8_0 where ``cols`` is not a multiple of 256 (SmolLM2's 576, Gemma-3 270M's 640);
    the testbed's 256 gets Q6_K."""
    return _fallback(_output_type("Q6_K", cols), cols)


def embedding_type_name(name: str) -> str:
    """An embedding type as given (``allocate.embedding_type``, ``--embedding-type``): ``auto``, or a format in the
    registry's spelling; an unknown name is refused, named."""
    return EMBEDDING_AUTO if name == EMBEDDING_AUTO else get_format(name).name


def resolve_embedding_type(name: str, cols: int) -> str:
    """The GGUF type an embedding type (:func:`embedding_type_name`) writes for rows of ``cols`` values: ``auto`` is
    :func:`auto_embedding_type`."""
    name = embedding_type_name(name)
    return auto_embedding_type(cols) if name == EMBEDDING_AUTO else name


def llama_rules(lm: object, ftype: str, has_imatrix: bool = False) -> dict[str, str]:
    """GGUF tensor name -> type that ``llama-quantize <ftype>`` picks for ``lm`` (a dense Llama-family model).

    Covers every quantizable matrix plus ``token_embd.weight`` and ``output.weight`` (when untied), after the
    shape fallback for row lengths that do not divide into 256 (SmolLM2: only ``ffn_down`` keeps K-quants).
    ``has_imatrix`` matters for Q4_0/Q5_0 and IQ4_NL (their ``ffn_down`` rule depends on it).
    """
    if ftype not in LLAMA_PRESETS:
        raise ValueError(f"unknown llama.cpp preset {ftype!r}; expected one of {', '.join(LLAMA_PRESETS)}")
    default, rules = LLAMA_PRESETS[ftype]
    cfg = lm.config  # type: ignore[attr-defined]
    n_layer = int(cfg.num_hidden_layers)
    gqa = int(cfg.num_attention_heads) // int(cfg.num_key_value_heads)
    out: dict[str, str] = {}
    # llama-quantize visits tensors sorted by block, so each kind's counter equals the block index here
    for m in lm.matrices():  # type: ignore[attr-defined]
        rule = rules.get(m.role)
        chosen = rule(_RuleContext(m.block, n_layer, gqa, has_imatrix)) if rule else None
        out[m.gguf_name] = _fallback(chosen or default, m.shape[1])
    hidden = int(cfg.hidden_size)
    if bool(getattr(cfg, "tie_word_embeddings", False)):
        out["token_embd.weight"] = _fallback(_output_type(default, hidden), hidden)
    else:
        out["token_embd.weight"] = _fallback(default, hidden)
        out["output.weight"] = _fallback(_output_type(default, hidden), hidden)
    return out


def preset_allocation(slots: Sequence[Slot], types: Mapping[str, str]) -> Allocation:
    """The matrices' part of a preset's per-tensor types, as an allocation (validated: every type must be legal)."""
    missing = [s.gguf_name for s in slots if s.gguf_name not in types]
    if missing:
        raise AllocationError(f"preset types lack {len(missing)} matrices, e.g. {missing[:3]}")
    alloc = {s.gguf_name: types[s.gguf_name] for s in slots}
    validate(list(slots), alloc)
    return alloc


def uniform_baselines(slots: Sequence[Slot], formats: Iterable[str] = QUANT_CHOICES) -> dict[str, Allocation]:
    """method name -> allocation: each format everywhere it is legal.

    A format legal on every slot gives ``"uniform-<fmt>"``. A K-quant legal only on some slots gives
    ``"uniform-<fmt>+<fallback>-fallback"``: the K-quant where legal, llama.cpp's 32-block fallback type
    elsewhere, each tensor's type written out. Any other format that is not legal everywhere raises.
    """
    out: dict[str, Allocation] = {}
    for fmt in formats:
        fmt = get_format(fmt).name
        if all(fmt in s.formats for s in slots):
            out[f"uniform-{fmt}"] = {s.gguf_name: fmt for s in slots}
            continue
        fb = KQUANT_FALLBACK.get(fmt)
        if fb is None:
            bad = next(s for s in slots if fmt not in s.formats)
            raise AllocationError(
                f"{bad.gguf_name}: format {fmt} is not legal for shape {list(bad.shape)} and has no fallback "
                f"(fallbacks exist for {', '.join(KQUANT_FALLBACK)})"
            )
        alloc = {s.gguf_name: fmt if fmt in s.formats else fb for s in slots}
        validate(list(slots), alloc)
        out[f"uniform-{fmt}+{fb}-fallback"] = alloc
    return out
