"""The data-quality pipeline and dataset loading, each rule checked by its report counts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flywheel.errors import DatasetError
from flywheel.text import dedupe_key, normalize_text
from retrain.data import load_dataset
from retrain.quality import QualityPipeline


def frame(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["text", "label"])


def clean(rows: list[tuple[str, str]], **kwargs: object) -> tuple[pd.DataFrame, dict[str, int]]:
    data, report = QualityPipeline(max_text_chars=200, **kwargs).run(frame(rows))  # type: ignore[arg-type]
    assert report.rows_in == len(rows)
    assert report.rows_out == len(data)
    assert report.rows_in - report.rows_out == sum(d.count for d in report.dropped.values())
    return data, {reason: d.count for reason, d in report.dropped.items()}


def test_normalisation_folds_unicode_and_whitespace() -> None:
    assert normalize_text("  ﬁne\u200b  film\t\n!  ") == "fine film !"
    assert dedupe_key("Great   FILM!!") == dedupe_key("great film")


def test_exact_and_normalised_duplicates_are_dropped() -> None:
    data, drops = clean(
        [("a great film", "pos"), ("a great film", "pos"), ("A great film!", "pos"), ("dull", "neg"), ("x", "neg")]
    )
    assert drops == {"exact_duplicate": 1, "normalized_duplicate": 1}
    assert data["text"].tolist() == ["a great film", "dull", "x"]


def test_conflicting_labels_resolve_by_majority_and_drop_ties() -> None:
    data, drops = clean(
        [
            ("fine movie", "pos"),
            ("Fine movie.", "pos"),
            ("fine  movie", "neg"),
            ("so-so", "pos"),
            ("so so", "neg"),
            ("great", "pos"),
            ("awful", "neg"),
        ]
    )
    assert drops["conflict_tied"] == 2
    assert drops["conflict_minority"] == 1
    assert drops["normalized_duplicate"] == 1
    kept = dict(zip(data["text"], data["label"], strict=True))
    assert kept["fine movie"] == "pos"
    assert "so-so" not in kept and "so so" not in kept


def test_empty_overlong_and_unknown_labels_are_reported_with_examples() -> None:
    rows = [("", "pos"), ("   ", "neg"), ("ok", ""), ("x" * 201, "pos")]
    rows += [("good", "pos"), ("bad", "neg"), ("meh", "mid")]
    data, drops = clean(rows, allowed_labels={"pos", "neg"})
    assert drops == {"empty_text": 2, "empty_label": 1, "too_long": 1, "unknown_label": 1}
    assert len(data) == 2
    report = QualityPipeline(max_text_chars=200, allowed_labels={"pos", "neg"}).run(frame(rows))[1]
    assert report.dropped["unknown_label"].examples == ["meh"]
    assert "too_long" in report.render()


def test_class_balance_summary() -> None:
    _, report = QualityPipeline(max_text_chars=100).run(frame([("a", "x"), ("b", "x"), ("c", "x"), ("d", "y")]))
    assert report.class_balance == {"x": 3, "y": 1}
    assert report.imbalance_ratio == 3.0


def test_fewer_than_two_labels_is_an_error() -> None:
    with pytest.raises(DatasetError, match="at least 2 distinct labels"):
        QualityPipeline(max_text_chars=100).run(frame([("a", "x"), ("b", "x")]))


def test_nothing_left_is_an_error() -> None:
    with pytest.raises(DatasetError, match="no rows left"):
        QualityPipeline(max_text_chars=100).run(frame([("", "x"), (" ", "y")]))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_load_dataset_formats_and_custom_columns(tmp_path: Path, suffix: str) -> None:
    data = pd.DataFrame({"review": ["good", "bad"], "sentiment": ["pos", "neg"], "extra": [1, 2]})
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        data.to_csv(path, index=False)
    elif suffix == ".jsonl":
        data.to_json(path, orient="records", lines=True)
    else:
        data.to_parquet(path)
    loaded = load_dataset(path, text_column="review", label_column="sentiment")
    assert loaded.to_dict("records") == [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]


def test_load_dataset_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.csv")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\ncaf\xe9 au lait,pos\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not valid UTF-8"):
        load_dataset(latin1)
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("text,target\nhello,pos\n")
    with pytest.raises(DatasetError, match="no column 'label'"):
        load_dataset(no_label)
    with pytest.raises(DatasetError, match="unsupported dataset format"):
        load_dataset(no_label.rename(tmp_path / "data.xlsx"))
