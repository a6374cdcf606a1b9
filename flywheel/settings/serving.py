"""HTTP service, batching, request log and hot-reload options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flywheel.settings.core import FlywheelSettings


class ServingSettings(FlywheelSettings):
    """Serving, request log and hot reload."""

    serve_host: str = Field(
        "127.0.0.1",
        description="Address `flywheel serve` binds; a non-loopback one needs a key to exist (see FLYWHEEL_AUTH).",
    )
    serve_port: int = Field(3000, ge=1, le=65535, description="Port `flywheel serve` listens on.")
    serve_workers: int = Field(
        1, ge=1, description="Service worker processes; each loads the model and splits the CPU threads."
    )
    serve_timeout: float = Field(60.0, gt=0, description="Seconds a request may take before it is answered 504.")
    serve_access_log: bool = Field(True, description="Write one access-log line per HTTP request.")
    serve_tracing: bool = Field(
        False,
        description="Record BentoML's OpenTelemetry spans of each HTTP request (export them by naming an exporter "
        "in BENTOML_CONFIG). Off, no request is traced: its spans cost about 6% of a worker's CPU at 32 clients.",
    )
    predict_max_texts: int = Field(256, ge=1, description="Most texts accepted in one /predict request.")
    predict_max_chars: int = Field(
        20_000, ge=1, description="Longest text accepted by /predict, in characters; longer ones are answered 413."
    )
    batch_max_size: int = Field(
        64, ge=1, description="Most texts in one inference batch, gathered across concurrent requests."
    )
    inference_batch_size: int | None = Field(
        None,
        ge=1,
        description="Most texts per forward pass: gathered texts are ordered by token count and cut into passes of "
        "at most this many (on CPU where padding would cost more than a pass); default 16 on CPU (cache-sized), the "
        "whole batch on GPU.",
    )
    batch_max_wait_ms: float = Field(
        10.0, ge=0, description="Longest wait for concurrent requests to join a batch once traffic is concurrent."
    )
    reload_interval: float = Field(
        2.0, gt=0, description="Seconds between checks of the registry's champion pointer for hot reload."
    )
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto",
        description="Runtime of the forward passes: auto = the one the model card chose at registration (the "
        "fastest that keeps macro-F1 and labels, see FLYWHEEL_RUNTIME_*; PyTorch half precision on CUDA); torch, "
        "onnx or onnx-int8 force one (torch also builds no ONNX variants at registration).",
    )
    runtime_max_f1_drop: float = Field(
        0.005, ge=0, description="Most macro-F1 a runtime variant may lose against PyTorch fp32 to be chosen."
    )
    runtime_min_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="Least share of evaluation texts on which a variant's predicted label must equal fp32's.",
    )
    runtime_eval_texts: int = Field(
        500,
        ge=1,
        description="Texts runtime variants are measured on at registration: the golden holdout and validation "
        "rows, topped up with training rows when they are fewer.",
    )
    log_predictions: bool = Field(True, description="Publish every prediction to the flywheel.predictions topic.")
    canary_min_labelled: int = Field(
        30,
        ge=1,
        description="Trusted labels needed on the requests a canary answered, and on the champion's of the same "
        "period, before the canary's accuracy is judged (see FLYWHEEL_CANARY_MAX_ACCURACY_DROP).",
    )
    canary_max_accuracy_drop: float = Field(
        0.05,
        ge=0,
        le=1,
        description="A canary whose accuracy on trusted feedback for the requests it answered falls more than this "
        "below the champion's over the same period is withdrawn automatically (0.05 = 5 points).",
    )
    admission_max_texts: int | None = Field(
        None,
        ge=1,
        description="Texts one worker admits in flight (waiting for or in inference); beyond it /predict answers "
        "503 with Retry-After. Unset = the worker's measured texts/s × FLYWHEEL_ADMISSION_QUEUE_SECONDS, kept "
        "between FLYWHEEL_ADMISSION_MIN_TEXTS and FLYWHEEL_ADMISSION_CEILING_TEXTS.",
    )
    admission_queue_seconds: float = Field(
        0.5,
        gt=0,
        description="Seconds of inference, at the measured throughput, a worker admits ahead of itself (at most "
        "FLYWHEEL_SERVE_TIMEOUT: more would be answered 504); what an admitted request waits at worst. The "
        "default keeps one batch waiting while one computes: the model never idles, and overload adds no more "
        "than one batch's time to an admitted request.",
    )
    admission_min_texts: int = Field(
        16,
        ge=1,
        description="Floor of the measured text bound: one forward pass on CPU, so a slow runtime still computes "
        "full passes. Until a batch of at least one forward pass is measured the bound is FLYWHEEL_BATCH_MAX_SIZE "
        "(a burst one batch serves).",
    )
    admission_ceiling_texts: int = Field(8192, ge=1, description="Ceiling of the measured text bound.")
    admission_max_body_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="Request-body bytes one worker holds at once for /predict (being read, or of "
        "requests in flight); beyond it requests are answered 503 before their bodies are read. Keeps memory "
        "bounded whatever the offered load.",
    )
    feedback_max_in_flight: int | None = Field(
        None,
        ge=1,
        description="/feedback requests one worker admits in flight; unset = its measured requests/s × "
        "FLYWHEEL_ADMISSION_QUEUE_SECONDS, between 16 and 1024.",
    )
    idempotency_ttl_seconds: float = Field(
        3600.0,
        gt=0,
        description="Seconds a /predict answer is kept for retries carrying the same Idempotency-Key (per "
        "principal, per worker process).",
    )
    idempotency_max_bytes: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="Bytes of kept /predict answers per worker; the oldest are forgotten first beyond it.",
    )
