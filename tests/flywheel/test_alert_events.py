"""Alert events of both kinds on ``flywheel.alerts``, and version-1 alerts (from before kinds) still read."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import pytest
from pydantic import Field

from flywheel.events import AlertEvent, AlertKind, Event, EventDecodeError, Topic, decode, encode

#: A drift alert exactly as a version-1 producer wrote it (no kind).
V1_ALERT = (
    b'{"schema_version": 1, "event_id": "0190b6a2-0000-7000-8000-000000000001", '
    b'"emitted_at": "2024-07-01T12:00:00Z", "report_id": "r-old", "model_version": "v3", "verdict": "drifted", '
    b'"drift_score": 0.5, "signals": {"embeddings": {"score": 0.8}}, "current_rows": 400, "reference_rows": 900}'
)


class V1DriftAlert(Event):
    """The alerts topic's schema before version 2, as readers from then decode it."""

    topic: ClassVar[Topic] = Topic.ALERTS

    report_id: str
    model_version: str
    verdict: Literal["drifted"] = "drifted"
    drift_score: float
    signals: dict[str, Any] = Field(default_factory=dict)
    current_rows: int
    reference_rows: int


def label_share_alert() -> AlertEvent:
    return AlertEvent(
        kind=AlertKind.LABEL_SHARE,
        report_id="r2",
        model_version="v4",
        current_rows=500,
        reference_rows=900,
        label="billing",
        current_share=0.61,
        reference_share=0.2,
        z_score=22.9,
        examples=["I was charged twice", "refund my card"],
    )


def test_a_version_1_alert_reads_as_a_drift_alert() -> None:
    event = decode(Topic.ALERTS, V1_ALERT)

    assert isinstance(event, AlertEvent)
    assert event.kind is AlertKind.DRIFT
    assert event.schema_version == 1
    assert (event.report_id, event.verdict, event.drift_score) == ("r-old", "drifted", 0.5)
    assert "drift score 0.500" in event.describe()


def test_a_label_share_alert_round_trips_with_its_kind_and_fields() -> None:
    alert = label_share_alert()

    payload = json.loads(encode(alert))
    event = decode(Topic.ALERTS, encode(alert))

    assert payload["schema_version"] == 2
    assert payload["kind"] == "label_share"
    assert event == alert
    assert event.describe() == (
        "Label share of 'billing' on model v4: 0.610 of 500 predictions vs 0.200 in the reference, "
        "+22.9 standard errors; report r2"
    )


def test_new_drift_alerts_still_read_by_version_1_readers_and_label_share_alerts_refused() -> None:
    drift = AlertEvent(report_id="r1", model_version="v4", drift_score=0.25, current_rows=300, reference_rows=900)

    old = V1DriftAlert.model_validate_json(encode(drift))

    assert (old.report_id, old.verdict, old.drift_score) == ("r1", "drifted", 0.25)
    # An old worker must not retrain on a label-share alert: to it the event is malformed.
    with pytest.raises(ValueError, match="drift_score"):
        V1DriftAlert.model_validate_json(encode(label_share_alert()))


@pytest.mark.parametrize(
    ("payload", "missing"),
    [
        ({"kind": "drift", "report_id": "r", "model_version": "v", "current_rows": 1, "reference_rows": 1}, "drift"),
        (
            {"kind": "label_share", "report_id": "r", "model_version": "v", "current_rows": 1, "reference_rows": 1},
            "label, current_share and reference_share",
        ),
        ({"kind": "spam", "report_id": "r", "model_version": "v", "current_rows": 1, "reference_rows": 1}, "kind"),
    ],
)
def test_an_alert_without_the_fields_of_its_kind_is_refused(payload: dict[str, Any], missing: str) -> None:
    with pytest.raises(EventDecodeError, match=missing):
        decode(Topic.ALERTS, json.dumps(payload).encode())
