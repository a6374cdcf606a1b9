"""The naive peer of the serving benchmark: FastAPI and a ``transformers.pipeline``, one text per call.

What a user writes first: the model loaded once into a text-classification pipeline, called from a plain async
route. The version's encoder is loaded as a Hugging Face sequence classifier (its mean-pooled head is Flywheel's
own layout, so the pipeline puts a [CLS] head of the same size in its place): the forward pass costs the same.

    FLYWHEEL_PEER_MODEL=/path/to/version/model uvicorn naive:app --app-dir benchmarks/peers --port 8000
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline


class Query(BaseModel):
    text: str


app = FastAPI()
state: dict[str, Any] = {}


@app.on_event("startup")
def load() -> None:
    model = os.environ["FLYWHEEL_PEER_MODEL"]
    length = int(os.environ.get("FLYWHEEL_PEER_MAX_LENGTH", "128"))
    state["pipeline"] = pipeline(
        "text-classification", model=model, tokenizer=model, truncation=True, max_length=length
    )


@app.post("/predict")
def predict(query: Query) -> dict[str, Any]:
    return state["pipeline"](query.text)[0]
