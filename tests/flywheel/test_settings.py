"""Settings: every option documented in the README, environment parsing as users write it."""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.settings import Settings

README = Path(__file__).parents[2] / "README.md"


def test_every_option_is_in_the_readme_table() -> None:
    readme = README.read_text()
    names = [f"FLYWHEEL_{name.upper()}" for name in Settings.model_fields]
    missing = [name for name in names if f"`{name}`" not in readme]
    assert not missing, f"document these in README.md's configuration table: {missing}"


def test_every_option_has_a_description() -> None:
    assert all(field.description for field in Settings.model_fields.values())


def test_environment_overrides_and_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("FLYWHEEL_API_KEYS", "k1, k2")
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", "secret")
    settings = Settings()
    assert settings.home == tmp_path / "state"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'state' / 'flywheel.db'}"
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert "secret" not in repr(settings)
