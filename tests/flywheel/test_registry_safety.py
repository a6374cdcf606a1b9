"""The champion pointer: promotion is a compare-and-swap, and it names only models already on disk."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.errors import RegistryError
from flywheel.registry import ChampionChangedError, ModelRegistry
from tests.conftest import copy_home, settings_from
from tests.flywheel.model_files import WEIGHTS_FILE, register_copy


@pytest.fixture()
def registry(trained_home: dict[str, str], tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(settings_from(copy_home(trained_home, tmp_path / "home")))


def test_promotion_expecting_another_champion_changes_nothing_and_says_why(registry: ModelRegistry) -> None:
    first = registry.champion()
    assert first is not None
    second = register_copy(registry)
    before = registry.pointer_path.read_bytes()

    with pytest.raises(ChampionChangedError) as refused:
        registry.promote(second, reason="test", expected="20240101-stale")

    message = str(refused.value)
    assert message.startswith(f"the champion is {first}, not 20240101-stale as expected")
    assert f"so {second} was not made champion" in message and "`flywheel models list`" in message
    assert registry.pointer_path.read_bytes() == before

    assert registry.promote(second, reason="test", expected=first).previous == first
    assert registry.champion() == second
    # The caller that still believes the first champion serves loses the race.
    with pytest.raises(ChampionChangedError, match=f"the champion is {second}, not {first}"):
        registry.promote(first, reason="test", expected=first)
    assert registry.champion() == second


def test_a_guard_that_refuses_under_the_lock_leaves_the_pointer_as_it_was(registry: ModelRegistry) -> None:
    first = registry.champion()
    second = register_copy(registry)
    before = registry.pointer_path.read_bytes()

    def lease_gone() -> None:
        raise RegistryError("lease gone")

    with pytest.raises(RegistryError, match="lease gone"):
        registry.promote(second, reason="test", expected=first, guard=lease_gone)
    assert registry.pointer_path.read_bytes() == before and registry.champion() == first
    assert not list(registry.directory.glob(".champion.json.*")), "no temporary pointer file is left behind"


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to watch the system calls")
def test_the_pointer_names_a_model_only_after_its_files_and_directories_are_on_disk(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    first = registry.champion()
    second = register_copy(registry)
    entry = registry.get(second)
    script = (
        "from pathlib import Path; from flywheel.registry import ModelRegistry; "
        "from flywheel.settings import Settings; "
        f"ModelRegistry(Settings(home=Path({str(registry.directory.parent)!r}))).promote({second!r}, "
        f"reason='test', expected={first!r})"
    )
    trace = tmp_path / "strace.txt"
    # -y prints each file descriptor's path: which file or directory every fsync flushed.
    subprocess.run(
        ["strace", "-f", "-y", "-o", str(trace), "-e", "trace=fsync,rename,renameat,renameat2", sys.executable, "-c",
         script],
        check=True, env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"}, timeout=120,
    )
    calls = trace.read_text().splitlines()
    synced = [re.search(r"fsync\(\d+<([^>]*)>\)", line) for line in calls]
    synced_at = {match.group(1): index for index, match in enumerate(synced) if match}
    pointer = str(registry.pointer_path.resolve())
    renamed = [i for i, line in enumerate(calls) if "rename" in line and f'"{pointer}"' in line and "= 0" in line]
    assert len(renamed) == 1, calls
    swap = renamed[0]

    version_dir = entry.path.resolve()
    for path in (version_dir / "model" / WEIGHTS_FILE, version_dir / "model", version_dir, version_dir.parent):
        assert str(path) in synced_at and synced_at[str(path)] < swap, f"{path} was not flushed before the swap"
    temporary = [p for p, i in synced_at.items() if Path(p).name.startswith(".champion.json.") and i < swap]
    assert temporary, "the new pointer's contents were flushed before the rename"
    assert synced_at.get(str(registry.directory.resolve()), -1) > swap, "the rename itself was flushed"
    assert registry.champion() == second
