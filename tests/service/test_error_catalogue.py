"""The README's error catalogue is the OpenAPI document's: the same statuses for `POST /predict` and `/feedback`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

README = Path(__file__).parents[2] / "README.md"


def _catalogue() -> dict[str, set[str]]:
    """Statuses the README's "Error statuses" table marks for each route."""
    text = README.read_text()
    table = text[text.index("**Error statuses.**") :].split("\n\n")[1]
    routes: dict[str, set[str]] = {"/predict": set(), "/feedback": set()}
    for line in table.splitlines()[2:]:
        status, _, predict, feedback = (cell.strip() for cell in line.strip("|").split("|"))
        assert re.fullmatch(r"\d{3}", status), line
        for route, mark in (("/predict", predict), ("/feedback", feedback)):
            if mark == "yes":
                routes[route].add(status)
    return routes


@pytest.mark.slow
def test_the_readme_lists_every_error_status_openapi_declares(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for route, statuses in _catalogue().items():
        declared = {code for code in paths[route]["post"]["responses"] if code.startswith(("4", "5"))}
        assert declared == statuses, f"{route}: OpenAPI {sorted(declared)} vs README {sorted(statuses)}"
