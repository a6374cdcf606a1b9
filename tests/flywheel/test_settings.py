"""Settings: one class per concern, the README's table generated from them, environment parsing as users write it.

After changing an option, regenerate the table with ``.venv/bin/python tests/flywheel/test_settings.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from flywheel.settings import DriftSettings, FeedbackSettings, Settings

README = Path(__file__).parents[2] / "README.md"
HEADER = "| variable | default | meaning |\n|---|---|---|\n"
START = "<!-- generated from flywheel/settings/ by `python tests/flywheel/test_settings.py`; do not edit -->\n"
END = "<!-- end of generated configuration -->\n"
CONCERNS: tuple[type[BaseSettings], ...] = Settings.__bases__


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is None:
        return "(unset)"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(empty)"
    if isinstance(value, Path):
        # Relative to the working directory; the validator resolves it there.
        return f"./{value}"
    return str(value)


def render_configuration() -> str:
    """The README's configuration tables: one section per concern class, one row per option."""
    sections = []
    for concern in CONCERNS:
        title = (concern.__doc__ or concern.__name__).splitlines()[0].rstrip(".")
        rows = "".join(
            f"| `FLYWHEEL_{name.upper()}` | `{_default(field)}` | {field.description} |\n"
            for name, field in concern.model_fields.items()
        )
        sections.append(f"### {title} (`{concern.__name__}`)\n\n{HEADER}{rows}")
    return START + "\n" + "\n".join(sections) + "\n" + END


def _readme_with_configuration(readme: str) -> str:
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    assert start and end, f"README.md lost the generated-configuration markers {START.strip()!r}, {END.strip()!r}"
    return head + render_configuration() + tail


def test_readme_configuration_is_generated_from_the_settings() -> None:
    readme = README.read_text()
    assert _readme_with_configuration(readme) == readme, (
        "README.md's configuration tables are stale: run .venv/bin/python tests/flywheel/test_settings.py"
    )


def test_every_option_has_a_description() -> None:
    assert all(field.description for field in Settings.model_fields.values())


def test_settings_is_exactly_the_concerns() -> None:
    # A field declared in two concerns would silently shadow the other one in Settings.
    per_concern = [name for concern in CONCERNS for name in concern.model_fields]
    assert len(per_concern) == len(set(per_concern))
    assert set(per_concern) == set(Settings.model_fields)


def test_environment_overrides_and_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("FLYWHEEL_API_KEYS", "k1, k2")
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", "s3cr3t-admin-token")
    settings = Settings()
    assert settings.home == tmp_path / "state"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / 'state' / 'flywheel.db'}"
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert "s3cr3t-admin-token" not in repr(settings)


def test_each_concern_reads_the_environment_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_FEEDBACK_RATE_LIMIT_ANNOTATOR", "500")
    monkeypatch.setenv("FLYWHEEL_DRIFT_MIN_ROWS", "300")
    monkeypatch.setenv("FLYWHEEL_SERVE_PORT", "3001")
    assert FeedbackSettings().feedback_rate_limit_annotator == 500
    drift = DriftSettings()
    assert drift.drift_min_rows == 300
    assert not hasattr(drift, "serve_port")
    for concern in CONCERNS:
        concern()


if __name__ == "__main__":
    README.write_text(_readme_with_configuration(README.read_text()))
