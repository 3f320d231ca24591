"""Offline assets: the manifest matches the files, and fetching again changes nothing."""

import json

from ramp.assets import FILES, fetch_assets, manifest_path
from ramp.io import sha256_file


def test_fetch_is_idempotent_and_manifest_is_true():
    before = manifest_path().stat().st_mtime_ns
    manifest = fetch_assets()  # must verify and return without installing or rewriting anything
    assert manifest_path().stat().st_mtime_ns == before
    assert set(manifest["files"]) == set(FILES) | {"gemma3"}
    smollm2 = manifest["files"]["smollm2"]
    assert smollm2["bytes"] == 98_362_432
    assert manifest["files"]["gemma3"]["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert json.loads(manifest_path().read_text()) == manifest


def test_manifest_hash_is_the_file_hash():
    manifest = json.loads(manifest_path().read_text())
    from pathlib import Path

    wiki = manifest["files"]["wiki"]
    assert sha256_file(Path(wiki["path"])) == wiki["sha256"]
