"""Registry helpers of the promotion and corrupt-champion tests: new versions from the champion's files, and real
damage to a version's weights."""

from __future__ import annotations

import shutil
from pathlib import Path

from flywheel.registry import TRAINING_DATA_FILE, ModelRegistry

#: The encoder's weights in a saved version (``save_pretrained`` output).
WEIGHTS_FILE = "model.safetensors"


def register_copy(registry: ModelRegistry, of: str | None = None) -> str:
    """Register a new version holding the files of ``of`` (default: the champion); returns its version."""
    source = registry.get(of) if of else registry.champion_version()

    def write(path: Path) -> None:
        shutil.copytree(source.model_dir, path / "model", dirs_exist_ok=True)
        shutil.copy(source.training_data_path, path / TRAINING_DATA_FILE)

    card = source.card.model_copy(update={"parent_version": source.version})
    return registry.save(card, write).version


def truncate_weights(registry: ModelRegistry, version: str) -> Path:
    """Cut the version's weights file to half its size, as a full disk or an interrupted copy leaves it."""
    path = registry.get(version).model_dir / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def garble_header(registry: ModelRegistry, version: str) -> Path:
    """Overwrite the first bytes of the version's weights file (its header length and JSON) with garbage."""
    path = registry.get(version).model_dir / WEIGHTS_FILE
    with open(path, "r+b") as handle:
        handle.write(b"\xff" * 64)
    return path
