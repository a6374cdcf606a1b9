"""The BentoML peer of the serving benchmark: a plain ``@bentoml.api(batchable=True)`` service, as BentoML's examples
write one, over the same classifier (PyTorch fp32, the version's own weights).

    FLYWHEEL_PEER_MODEL=/path/to/version/model bentoml serve bento:PlainClassifier --working-dir benchmarks/peers
"""

from __future__ import annotations

import os

import bentoml


@bentoml.service(workers=1)
class PlainClassifier:
    def __init__(self) -> None:
        from flywheel.classifier import Classifier

        length = int(os.environ.get("FLYWHEEL_PEER_MAX_LENGTH", "128"))
        self.classifier = Classifier.load(os.environ["FLYWHEEL_PEER_MODEL"], max_length=length)

    # A latency bound past any wait of the benchmark: refusals (503) would pass for throughput otherwise.
    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=60_000)
    def predict(self, texts: list[str]) -> list[float]:
        return self.classifier.predict_proba(texts).probs[:, 1].tolist()
