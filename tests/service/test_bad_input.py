"""Bad requests get a 4xx with a readable message, never a 500, and the app keeps answering."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


BAD_REQUESTS = [
    # (case, body, status, words the message must contain)
    ("empty body", b"", 400, "empty"),
    ("malformed JSON", b'{"text": "unterminated', 400, "not valid JSON"),
    ("not UTF-8", b'{"text": "\xff\xfe"}', 400, "UTF-8"),
    ("JSON list body", _json(["a", "b"]), 422, "JSON object"),
    ("JSON null body", b"null", 422, "JSON object"),
    ("empty text", _json({"text": ""}), 422, "empty"),
    ("whitespace-only text", _json({"text": " \n\t "}), 422, "whitespace"),
    ("number as text", _json({"text": 42}), 422, "must be a string"),
    ("null text", _json({"text": None}), 422, "must be a string"),
    ("texts not a list", _json({"texts": "a single string"}), 422, "list of strings"),
    ("null item in texts", _json({"texts": ["fine", None]}), 422, "texts[1]"),
    ("object item in texts", _json({"texts": [{"text": "x"}]}), 422, "texts[0]"),
    ("empty item in texts", _json({"texts": ["fine", "   "]}), 422, "texts[1]"),
    ("empty texts list", _json({"texts": []}), 422, "at least one"),
    ("both text and texts", _json({"text": "a", "texts": ["b"]}), 422, "exactly one"),
    ("neither text nor texts", _json({}), 422, "exactly one"),
    ("unknown field", _json({"txt": "typo"}), 422, "'txt'"),
    ("too many texts", _json({"texts": ["good"] * 257}), 413, "at most 256"),
    ("text over the character cap", _json({"text": "a" * 20_001}), 413, "20000"),
    ("item over the character cap", _json({"texts": ["ok", "b" * 25_000]}), 413, "texts[1]"),
]


@pytest.mark.parametrize(
    ("body", "status", "words"), [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_is_refused_with_a_message(client: TestClient, body: bytes, status: int, words: str) -> None:
    response = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail
    assert client.post("/predict", json={"text": "still great"}).status_code == 200


def test_wrong_method_and_unknown_path_are_4xx(client: TestClient) -> None:
    assert client.get("/predict").status_code == 405
    assert client.get("/nope").status_code == 404
    assert client.post("/predict", json={"text": "still answering"}).status_code == 200
