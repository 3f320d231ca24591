"""Tokenizer metadata of a Hugging Face directory, written by llama.cpp's own converter.

llama.cpp loads a GGUF only with its ``tokenizer.ggml.*`` keys (vocabulary, merges, token types, special ids, the
pre-tokenizer name). Rather than re-deriving them, RAMP runs the converter that ships with the pinned llama.cpp
source (``convert_hf_to_gguf.py --vocab-only`` with its own ``gguf-py``) on the directory's config and tokenizer
files, in a subprocess, and copies the ``tokenizer.*`` keys of the vocabulary file it writes. The result is cached
by the content of those files.

The converter recognises a BPE pre-tokenizer by hashing how it splits a test text; a tokenizer it has never seen
(e.g. one trained for the testbed) is refused unless the caller names the pre-tokenizer (``tokenizer_pre``, one of
llama.cpp's names such as ``gpt-2``) or ``tokenizer.json`` spells out one RAMP recognises exactly
(:func:`structural_pre`); either is used only when the converter's own check does not recognise the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf

from ramp.errors import RampError

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
HF_ARCHITECTURES = {  # model_type -> the class name the converter dispatches on
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# Run the converter as its own script, optionally naming the pre-tokenizer it does not recognise.
_WRAPPER = """
import runpy, sys
from pathlib import Path
conv, pre, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, str(Path(conv).parent))
sys.path.insert(1, str(Path(conv).parent / "gguf-py"))
if pre:
    import conversion.base as base
    known = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [conv, *args]
runpy.run_path(conv, run_name="__main__")
"""


class VocabError(RampError, ValueError):
    """A Hugging Face tokenizer that llama.cpp's converter cannot turn into GGUF metadata."""


def has_tokenizer(hf_dir: Path) -> bool:
    return any((Path(hf_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def _converter() -> Path:
    from ramp.llamacpp import LlamaCppMissing, source_dir

    conv = source_dir() / "convert_hf_to_gguf.py"
    if not conv.is_file():
        raise LlamaCppMissing(f"{conv} does not exist; run `make llama-cpp` first (it downloads the llama.cpp source)")
    return conv


def known_pre_tokenizers() -> set[str]:
    """The BPE pre-tokenizer names llama.cpp's runtime accepts (read from the pinned ``src/llama-vocab.cpp``)."""
    from ramp.llamacpp import LlamaCppMissing, source_dir

    src = source_dir() / "src" / "llama-vocab.cpp"
    if not src.is_file():
        raise LlamaCppMissing(f"{src} does not exist; run `make llama-cpp` first (it downloads the llama.cpp source)")
    return set(re.findall(r'tokenizer_pre == "([^"]+)"', src.read_text(encoding="utf-8")))


def _check_pre(tokenizer_pre: str) -> None:
    if tokenizer_pre and tokenizer_pre not in (known := known_pre_tokenizers()):
        close = sorted(k for k in known if k.replace("-", "")[:3] == tokenizer_pre.replace("-", "")[:3])
        raise VocabError(
            f"tokenizer_pre {tokenizer_pre!r} is not a pre-tokenizer llama.cpp knows"
            f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}; {len(known)} names in src/llama-vocab.cpp"
        )


def structural_pre(hf_dir: Path) -> str:
    """The llama.cpp pre-tokenizer a ``tokenizer.json`` spells out exactly, else "".

    Only one shape is recognised: a BPE model with no normalizer whose pre-tokenizer is byte-level with the GPT-2
    regex and no prefix space (what ``ramp.testbed.train_tokenizer`` and GPT-2 itself use) is llama.cpp's
    ``gpt-2``. The converter's own hash check runs first; this is asked only when it does not recognise the
    tokenizer and the caller named none.
    """
    try:
        spec = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(spec, dict) or spec.get("normalizer") is not None:
        return ""
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if (
        model.get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex") is True
        and pre.get("add_prefix_space") is False
    ):
        return "gpt-2"
    return ""


def vocab_gguf(hf_dir: str | Path, tokenizer_pre: str = "") -> Path:
    """The converter's ``--vocab-only`` GGUF of ``hf_dir`` (cached by the content of its config and tokenizer)."""
    from ramp.llamacpp import LLAMA_CPP_VERSION, cache_root

    hf_dir = Path(hf_dir)
    _check_pre(tokenizer_pre)
    if not has_tokenizer(hf_dir):
        raise VocabError(f"{hf_dir}: no tokenizer.json or tokenizer.model to write llama.cpp's tokenizer keys from")
    try:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VocabError(f"{hf_dir / 'config.json'}: unreadable ({e})") from e
    if not isinstance(config, dict):
        raise VocabError(f"{hf_dir / 'config.json'}: expected a JSON object")
    files = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    if not tokenizer_pre and (tokenizer_pre := structural_pre(hf_dir)):
        log.info("%s: tokenizer.json spells out llama.cpp's %r pre-tokenizer", hf_dir, tokenizer_pre)
    h = hashlib.sha256(f"{LLAMA_CPP_VERSION}|{tokenizer_pre}".encode())
    for f in ["config.json", *files]:
        h.update(f.encode() + b"\0" + (hf_dir / f).read_bytes())
    out = cache_root() / "vocab" / h.hexdigest()[:20] / "vocab.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as d:
        tmp = Path(d) / "vocab.gguf"
        _convert(hf_dir, config, files, Path(d), ["--vocab-only", "--outfile", str(tmp)], tokenizer_pre)
        os.replace(tmp, out)
    return out


def _convert(
    hf_dir: Path, config: dict, files: list[str], work: Path, args: list[str], tokenizer_pre: str, weights: bool = False
) -> None:
    """Run the converter on a staged copy of ``hf_dir`` (config with ``architectures``, tokenizer files)."""
    if not config.get("architectures"):
        model_type = config.get("model_type")
        if model_type not in HF_ARCHITECTURES:
            raise VocabError(f"{hf_dir}: model_type {model_type!r} has no llama.cpp converter class known to RAMP")
        config = {**config, "architectures": [HF_ARCHITECTURES[model_type]]}
    stage = work / "hf"
    stage.mkdir()
    (stage / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for f in files:
        shutil.copyfile(hf_dir / f, stage / f)
    if weights:
        for f in hf_dir.glob("*.safetensors*"):
            (stage / f.name).symlink_to(f.resolve())
    log.info("running llama.cpp's convert_hf_to_gguf.py %s on %s", " ".join(args[:1]), hf_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(_converter()), tokenizer_pre, *args, str(stage)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        last = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        hint = ""
        if "pre-tokenizer was not recognized" in proc.stderr:
            hint = "; name its pre-tokenizer (export tokenizer_pre, e.g. 'gpt-2' for a byte-level GPT-2 regex BPE)"
        raise VocabError(f"{hf_dir}: llama.cpp's converter failed: {last[0]}{hint}")


def convert_hf(hf_dir: str | Path, out: str | Path, outtype: str = "f32", tokenizer_pre: str = "") -> Path:
    """llama.cpp's own conversion of ``hf_dir`` to a GGUF file (the reference RAMP's exports are compared with)."""
    hf_dir, out = Path(hf_dir), Path(out)
    _check_pre(tokenizer_pre)
    tokenizer_pre = tokenizer_pre or structural_pre(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    files = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as d:
        tmp = Path(d) / "model.gguf"
        _convert(hf_dir, config, files, Path(d), ["--outtype", outtype, "--outfile", str(tmp)], tokenizer_pre, True)
        os.replace(tmp, out)
    return out


def vocab_metadata(hf_dir: str | Path, tokenizer_pre: str = "") -> list[tuple[str, Any, Any, Any]]:
    """``(key, value, value type, array element type)`` of every ``tokenizer.*`` key llama.cpp's converter writes."""
    reader = gguf.GGUFReader(vocab_gguf(hf_dir, tokenizer_pre))
    out = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    return out
