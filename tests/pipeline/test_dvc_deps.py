"""Every repository module a stage script imports (transitively, top-level or inside functions) is a ``deps`` entry
of that stage in ``dvc.yaml``, so that DVC reruns a stage whenever code it runs changes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from ramp.pipeline import STAGES

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ramp", "stages", "flows")


def module_file(name: str) -> Path | None:
    """The file of a repository module ``a.b.c`` (package ``__init__`` or module), else None."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*parts)
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    return None


def imported_modules(path: Path) -> set[str]:
    """Names of the modules ``path`` imports anywhere in its body (``from a import b``: ``a`` and ``a.b``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def closure(start: Path) -> set[Path]:
    """Repository files executed when ``start`` runs: its imports, their imports, and every parent package."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_modules(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                f = module_file(".".join(parts[:i]))
                if f is not None and f not in seen:
                    todo.append(f)
    return seen


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_every_imported_module(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    deps = [str(d) for d in spec["deps"]]
    files = closure(REPO / "stages" / f"{stage}.py")
    missing = sorted(p.relative_to(REPO).as_posix() for p in files if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} lacks deps for modules it imports: {missing}"


def test_closure_follows_function_level_imports():
    files = {p.relative_to(REPO).as_posix() for p in closure(REPO / "stages" / "quantize.py")}
    # ramp.formats is imported inside quantize()'s body, ramp.formats.q3_k only by the formats package
    assert {"ramp/pipeline/quantize.py", "ramp/formats/__init__.py", "ramp/formats/q3_k.py"} <= files
    assert "ramp/pipeline/train.py" not in files  # a stage's deps are its own imports, not the whole package


def test_stage_params_match_the_sections_the_stage_reads():
    from ramp.params import STAGE_SECTIONS

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in STAGES:
        assert tuple(stages[stage]["params"]) == STAGE_SECTIONS[stage], stage
