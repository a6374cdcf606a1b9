"""Bad requests get a 4xx with a readable message, never a 500, and the app keeps answering: the table of hostile
bodies, on ``POST /predict`` and on ``POST /feedback``, which reads its body the same way."""

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
    # Text that is not Unicode: tokenizing, logging or storing it would fail.
    ("lone high surrogate", b'{"text": "\\ud800"}', 422, "text contains \\ud800 at character 0: half of a UTF-16"),
    ("lone low surrogate", b'{"text": "ok \\udc00 ok"}', 422, "\\udc00 at character 3"),
    ("reversed surrogate pair", b'{"text": "\\udc00\\ud800"}', 422, "surrogate pair"),
    ("surrogate in a texts item", b'{"texts": ["fine", "x\\ud83d"]}', 422, "texts[1] contains \\ud83d"),
    ("surrogate in a key", b'{"\\ud800": "x"}', 422, "a key of the body"),
    ("surrogate encoded as UTF-8", b'{"text": "\xed\xa0\x80"}', 400, "not UTF-8"),
    ("NUL character", b'{"text": "a\\u0000b"}', 422, "NUL character (\\u0000) at character 1"),
    ("raw NUL byte", b'{"text": "a\x00b"}', 400, "Invalid control character"),
    ("overlong UTF-8", b'{"text": "\xc0\xaf"}', 400, "not UTF-8"),
    ("truncated UTF-8 sequence", b'{"text": "\xe2\x82"}', 400, "not UTF-8"),
    ("UTF-8 byte order mark", b'\xef\xbb\xbf{"text": "a"}', 400, "BOM"),
    ("UTF-16 body", '{"text": "a"}'.encode("utf-16"), 400, "not UTF-8"),
    # Nesting: refused before parsing (it made the parser raise RecursionError).
    ("arrays nested 1,000 deep", b'{"text": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, "more than 16 levels deep"),
    ("objects nested 1,000 deep", b'{"a": ' * 1000 + b"1" + b"}" * 1000, 400, "more than 16 levels deep"),
    ("nesting inside texts", _json({"texts": [[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]}), 400, "levels deep"),
    ("100,000 open brackets", b"[" * 100_000, 400, "levels deep"),
    # JSON that parses but cannot mean one request.
    ("duplicate key", b'{"text": "a", "text": "b"}', 422, "the key 'text' twice"),
    ("duplicate key in one of several", b'{"texts": ["a"], "x": 1, "x": 2}', 422, "the key 'x' twice"),
    ("NaN", b'{"texts": [NaN]}', 422, "NaN, which is not a finite number"),
    ("Infinity", b'{"text": Infinity}', 422, "Infinity"),
    ("-Infinity", b'{"text": -Infinity}', 422, "-Infinity"),
    ("number overflowing to infinity", b'{"text": 1e999}', 422, "not a finite number"),
    ("5,000-digit integer", b'{"text": ' + b"9" * 5000 + b"}", 422, "number of 5000 characters"),
    # Malformed or of the wrong shape.
    ("whitespace-only body", b" \n\t ", 400, "empty"),
    ("trailing garbage", b'{"text": "a"} x', 400, "Extra data"),
    ("two objects", b'{"text": "a"}{"text": "b"}', 400, "Extra data"),
    ("single quotes", b"{'text': 'a'}", 400, "double quotes"),
    ("unterminated string of brackets", b'{"text": "' + b"[" * 1000, 400, "Unterminated string"),
    ("unterminated string of escaped quotes", b'{"text": "' + b'\\"' * 100_000, 400, "Unterminated string"),
    ("JSON string body", _json("a wonderful film"), 422, "got a string"),
    ("JSON number body", b"42", 422, "got a number"),
    ("boolean as text", _json({"text": True}), 422, "got a boolean"),
    ("list as text", _json({"text": ["a"]}), 422, "'text' must be a string, got a list"),
    ("list item in texts", _json({"texts": [["a"]]}), 422, "texts[0] must be a string"),
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


def test_texts_that_look_hostile_but_are_valid_are_classified(client: TestClient) -> None:
    brackets = "[" * 5000 + "{" * 5000  # inside a string: text, not nesting
    pair = b'"\\ud83d\\ude00 great"'  # an escaped surrogate pair is one character, an emoji
    for body in (_json({"texts": [brackets, "\ufeff zero\u200bwidth"]}), b'{"text": ' + pair + b"}"):
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text


#: Hostile bodies of ``POST /feedback``: the same strict reading as ``/predict``, then its own schema.
BAD_FEEDBACK = [
    ("lone surrogate in text", b'{"text": "\\ud800", "label": "positive"}', 422, "text contains \\ud800"),
    ("NUL in comment", b'{"text": "t", "label": "positive", "comment": "a\\u0000"}', 422, "comment contains a NUL"),
    ("surrogate encoded as UTF-8", b'{"text": "\xed\xb0\x80", "label": "positive"}', 400, "not UTF-8"),
    ("nested 1,000 deep", b'{"text": ' + b"[" * 1000 + b"]" * 1000 + b', "label": "positive"}', 400, "levels deep"),
    ("duplicate label", b'{"text": "t", "label": "positive", "label": "negative"}', 422, "the key 'label' twice"),
    ("NaN label", b'{"text": "t", "label": NaN}', 422, "NaN"),
    ("5,000-digit integer", b'{"text": "t", "label": ' + b"9" * 5000 + b"}", 422, "number of 5000 characters"),
    ("UTF-8 byte order mark", b'\xef\xbb\xbf{"text": "t", "label": "positive"}', 400, "BOM"),
]


@pytest.mark.parametrize(
    ("body", "status", "words"), [case[1:] for case in BAD_FEEDBACK], ids=[c[0] for c in BAD_FEEDBACK]
)
def test_bad_feedback_body_is_refused_with_a_message(client: TestClient, body: bytes, status: int, words: str) -> None:
    response = client.post("/feedback", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_wrong_method_and_unknown_path_are_4xx(client: TestClient) -> None:
    assert client.get("/predict").status_code == 405
    assert client.get("/nope").status_code == 404
    assert client.post("/predict", json={"text": "still answering"}).status_code == 200
