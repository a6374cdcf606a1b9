"""Runtimes chosen per model and verified: ONNX export at registration, the card's evidence, loading in a runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from flywheel.broker import EmbeddedBroker
from flywheel.classifier import Classifier
from flywheel.quantization import smooth_graph
from flywheel.registry import ModelRegistry, ModelVersion
from flywheel.runtime import (
    FILES,
    INT8_FILE,
    ONNX_FILE,
    Runtime,
    VariantEvidence,
    _verdict,
    build,
    load_classifier,
    onnx_inputs,
    session,
)
from flywheel.settings import Settings
from retrain.pipeline import TrainingPipeline
from retrain.trainer import Trainer
from tests.conftest import TINY_TRAINING_ENV, app_client, copy_home, migrate, settings_from
from tests.support import synthetic_sentiment

TEXTS = ["a wonderful, moving film", "dull and far too long", "word " * 200, "it was fine i guess"]


@pytest.fixture(scope="module")
def runtime_home(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A home whose champion was registered with the default runtime choice (auto)."""
    env = {**fresh_env(tiny_base, tmp_path_factory.mktemp("runtime")), "FLYWHEEL_RUNTIME": "auto"}
    settings = settings_from(env)
    TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings, progress=False)).run(synthetic_sentiment(400))
    migrate(settings.resolved_database_url)
    return env


@pytest.fixture()
def home(runtime_home: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return copy_home(runtime_home, tmp_path / "home")


def test_registration_builds_onnx_variants_and_records_every_variants_evidence(home: dict[str, str]) -> None:
    champion = ModelRegistry(settings_from(home)).champion_version()
    evidence = champion.card.runtime_evidence
    built = [(v["runtime"], v["recipe"]) for v in evidence["variants"]]
    assert built[:3] == [("torch", ""), ("onnx", ""), ("onnx-int8", "dynamic")]
    # SmoothQuant is built only when plain int8 was refused.
    assert built[3:] == ([] if evidence["variants"][2]["accepted"] else [("onnx-int8", "smoothquant")])
    assert evidence["texts"] >= 400  # the holdout and validation rows, topped up from the training rows
    assert champion.card.runtime in {"torch", "onnx", "onnx-int8"}
    chosen = next(v for v in evidence["variants"] if v["runtime"] == champion.card.runtime)
    assert chosen["accepted"] and chosen["texts_per_second"] > 0
    onnx = next(v for v in evidence["variants"] if v["runtime"] == "onnx")
    # The fp32 graph computes what PyTorch computes.
    assert onnx["agreement"] == 1.0 and onnx["macro_f1"] == evidence["variants"][0]["macro_f1"]
    assert (champion.model_dir / ONNX_FILE).exists() and (champion.model_dir / INT8_FILE).exists()


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_a_version_loaded_in_an_onnx_runtime_classifies_and_embeds_like_pytorch(
    home: dict[str, str], runtime: str
) -> None:
    settings, champion, torch_classifier = _reference(home)
    onnx_classifier = load_classifier(champion, settings.model_copy(update={"runtime": runtime}))
    assert (torch_classifier.runtime, onnx_classifier.runtime) == ("torch", runtime)
    reference, served = torch_classifier.predict_proba(TEXTS), onnx_classifier.predict_proba(TEXTS)
    assert served.truncated == reference.truncated == [False, False, True, False]
    tolerance = 1e-4 if runtime == "onnx" else 0.1  # int8 weights move scores a little, not labels of clear texts
    assert np.allclose(served.probs, reference.probs, atol=tolerance)
    assert np.allclose(onnx_classifier.embed(TEXTS), torch_classifier.embed(TEXTS), atol=tolerance * 10)
    assert onnx_classifier.dtype == ("int8" if runtime == "onnx-int8" else "float32")


def test_the_service_serves_in_the_runtime_the_card_chose(home: dict[str, str], broker: EmbeddedBroker) -> None:
    champion = ModelRegistry(settings_from(home)).champion_version()
    for runtime in (champion.card.runtime, "onnx-int8"):
        forced = "auto" if runtime == champion.card.runtime else runtime
        env = {**home, "FLYWHEEL_RUNTIME": forced, "FLYWHEEL_KAFKA_BOOTSTRAP": broker.bootstrap}
        with app_client(env) as client:
            assert client.get("/model").json()["runtime"] == runtime
            answer = client.post("/predict", json={"texts": TEXTS})
            assert answer.status_code == 200
            assert [p["truncated"] for p in answer.json()["predictions"]] == [False, False, True, False]


def test_smoothing_leaves_what_the_graph_computes_and_the_int8_graph_keeps_feed_forward_outputs_in_fp32(
    home: dict[str, str], tmp_path: Path
) -> None:
    _, champion, classifier = _reference(home)
    tokenize = onnx_inputs(classifier)
    smoothed = tmp_path / "smoothed.onnx"
    assert smooth_graph(champion.model_dir / ONNX_FILE, smoothed, tokenize, TEXTS) > 0
    feed = tokenize(TEXTS)
    expected = session(champion.model_dir / ONNX_FILE).run(None, feed)
    for got, want in zip(session(smoothed).run(None, feed), expected, strict=True):
        assert np.allclose(got, want, atol=1e-4)


def test_when_plain_int8_changes_labels_the_smoothquant_graph_takes_its_place(
    home: dict[str, str], tmp_path: Path
) -> None:
    settings, champion, classifier = _reference(home)
    model_dir = tmp_path / "model"
    shutil.copytree(champion.model_dir, model_dir)
    (model_dir / INT8_FILE).unlink()
    # A gate no variant can pass (no macro-F1 loss below zero): every recipe is built and measured, fp32 serves.
    strict = settings.model_copy(update={"runtime_max_f1_drop": -1.0})
    texts = TEXTS * 30
    labels = [classifier.labels[i] for i in classifier.predict_proba(texts).probs.argmax(axis=1)]
    choice = build(classifier, model_dir, texts, labels, strict, calibration=TEXTS)
    assert choice.runtime == "torch"
    assert [(v.runtime, v.recipe, v.accepted) for v in choice.variants] == [
        ("torch", "", True),
        ("onnx", "", False),
        ("onnx-int8", "dynamic", False),
        ("onnx-int8", "smoothquant", False),
    ]
    nodes = onnx.load(str(model_dir / INT8_FILE)).graph.node
    assert any(node.name.startswith("smoothquant.") and node.op_type == "Mul" for node in nodes)
    feed_forward_outputs = [n for n in nodes if "/output/dense/" in n.name and "/attention/" not in n.name]
    assert feed_forward_outputs and {n.op_type for n in feed_forward_outputs} <= {"MatMul", "Add"}
    assert any(node.op_type in {"MatMulInteger", "DynamicQuantizeMatMul"} for node in nodes)


def test_a_missing_runtime_file_falls_back_to_pytorch(home: dict[str, str]) -> None:
    settings = settings_from(home)
    champion = ModelRegistry(settings).champion_version()
    (champion.model_dir / FILES[Runtime.ONNX]).unlink()
    classifier = load_classifier(champion, settings.model_copy(update={"runtime": "onnx"}))
    assert classifier.runtime == "torch"
    assert classifier.predict_proba(TEXTS).probs.shape == (len(TEXTS), 2)


def test_forcing_torch_builds_no_other_runtime(tiny_base: Path, tmp_path: Path) -> None:
    env = fresh_env(tiny_base, tmp_path)  # the tests' training settings force torch
    settings = settings_from(env)
    outcome = TrainingPipeline(settings, ModelRegistry(settings), Trainer(settings, progress=False)).run(
        synthetic_sentiment(200)
    )
    card = outcome.version.card
    assert card.runtime == "torch" and card.runtime_evidence["variants"] == []
    assert "FLYWHEEL_RUNTIME=torch" in card.runtime_evidence["reason"]
    assert not (outcome.version.model_dir / ONNX_FILE).exists()


def test_a_variant_is_refused_when_it_loses_macro_f1_or_agreement(home: dict[str, str]) -> None:
    settings = settings_from(home)
    reference = VariantEvidence(runtime="torch", macro_f1=0.90)
    close = VariantEvidence(runtime="onnx-int8", macro_f1=0.897, agreement=0.995)
    worse = VariantEvidence(runtime="onnx-int8", macro_f1=0.89, agreement=0.999)
    disagreeing = VariantEvidence(runtime="onnx-int8", macro_f1=0.90, agreement=0.98)
    assert _verdict(close, reference, settings)[0]
    accepted, reason = _verdict(worse, reference, settings)
    assert not accepted and "1.00 points below fp32" in reason
    accepted, reason = _verdict(disagreeing, reference, settings)
    assert not accepted and "98.00%" in reason


def _reference(home: dict[str, str]) -> tuple[Settings, ModelVersion, Classifier]:
    """The home's settings, its champion, and the champion loaded in PyTorch fp32 (the reference runtime)."""
    settings = settings_from(home)
    champion = ModelRegistry(settings).champion_version()
    return settings, champion, load_classifier(champion, settings.model_copy(update={"runtime": "torch"}))


def fresh_env(tiny_base: Path, directory: Path) -> dict[str, str]:
    return {"FLYWHEEL_HOME": str(directory / "fresh"), "FLYWHEEL_BASE_MODEL": str(tiny_base), **TINY_TRAINING_ENV}
