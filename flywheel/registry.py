"""The model registry: versions in the BentoML model store and a durable champion pointer."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from bentoml._internal.models import ModelStore

from flywheel.errors import RegistryError
from flywheel.settings import Settings
from flywheel.storage import atomic_write_text, fsync_tree

logger = logging.getLogger(__name__)

MODEL_NAME = "flywheel-classifier"
MODEL_SUBDIR = "model"
CARD_FILE = "card.json"
TRAINING_DATA_FILE = "training_data.parquet"


class _Whatever(Enum):
    ANY = "any"


#: ``expected`` for a promotion or rollback that applies whatever the champion is now (an operator's command).
ANY_CHAMPION = _Whatever.ANY


class ChampionChangedError(RegistryError):
    """A compare-and-swap of the champion pointer found another champion than the caller expected."""

    def __init__(self, expected: str | None, actual: str | None, version: str) -> None:
        super().__init__(
            f"the champion is {actual or 'none'}, not {expected or 'none'} as expected: it was promoted or rolled "
            f"back meanwhile, so {version} was not made champion; check `flywheel models list`, then "
            f"`flywheel models promote {version}` if it should serve anyway"
        )
        self.expected = expected
        self.actual = actual


class ModelCard(BaseModel):
    """Everything known about one trained model version, stored beside its weights."""

    version: str = ""
    labels: list[str]
    base_model: str
    parent_version: str | None = None
    max_length: int
    data_sha256: str
    holdout_sha256: str
    train_rows: int
    validation_rows: int
    holdout_metrics: dict[str, Any]
    validation_metrics: dict[str, Any]
    quality_report: dict[str, Any]
    hyperparameters: dict[str, Any]
    training_seconds: float
    epochs_run: int
    #: Optimizer steps taken (0 on cards written before training was scheduled by steps).
    steps_run: int = 0
    #: Validation macro-F1 of the linear-probe head before fine-tuning, when the head started as one.
    probe_macro_f1: float | None = None
    #: Share of the fine-tuned weights kept, the rest being the starting model's (1.0: no blend).
    weight_interpolation: float = 1.0
    stopped_because: str
    #: Runtime the version serves in (see ``flywheel.runtime``; "torch" on cards written before runtimes).
    runtime: str = "torch"
    #: Every runtime variant's figures on the evaluation texts, and why the runtime was chosen.
    runtime_evidence: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ModelVersion(BaseModel):
    """A registry entry: the card and where the files are."""

    version: str
    path: Path
    card: ModelCard

    @property
    def model_dir(self) -> Path:
        """Directory holding ``save_pretrained`` output."""
        return self.path / MODEL_SUBDIR

    @property
    def training_data_path(self) -> Path:
        """Parquet file with the rows this version was trained on."""
        return self.path / TRAINING_DATA_FILE


class PointerChange(BaseModel):
    """One change of the champion pointer."""

    action: Literal["promote", "rollback"]
    version: str
    previous: str | None
    reason: str
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class ChampionPointer(BaseModel):
    """The version that should serve, the stack rollback walks back, and the change history."""

    stack: list[str] = Field(default_factory=list)
    history: list[PointerChange] = Field(default_factory=list)

    @property
    def champion(self) -> str | None:
        """The serving version, if any."""
        return self.stack[-1] if self.stack else None

    @property
    def fallbacks(self) -> list[str]:
        """The champion, then the earlier champions a rollback would restore, newest first: what may serve when
        the ones before it cannot load (a challenger that was never champion never may)."""
        ordered: list[str] = []
        for version in reversed(self.stack):
            if version not in ordered:
                ordered.append(version)
        return ordered

    @property
    def promoted(self) -> set[str]:
        """Every version this pointer ever made champion, rolled back since or not."""
        return {change.version for change in self.history if change.action == "promote"}


class ModelRegistry:
    """Versions of ``flywheel-classifier`` in the BentoML store plus the champion pointer file."""

    def __init__(self, settings: Settings) -> None:
        os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
        #: BentoML home holding the model store: the state dir's, unless BENTOML_HOME says otherwise.
        self.bentoml_home = Path(os.environ.get("BENTOML_HOME") or settings.bentoml_home)
        self.directory = settings.home / "registry"
        self.pointer_path = self.directory / "champion.json"
        self._lock_path = self.directory / ".lock"

    def save(self, card: ModelCard, write: Callable[[Path], None]) -> ModelVersion:
        """Create a new version; ``write(dir)`` saves the model files into ``dir / "model"``."""
        import bentoml

        with bentoml.models.create(
            MODEL_NAME,
            _model_store=self._store(),
            labels={"task": "text-classification"},
            metadata={"labels": card.labels, "base_model": card.base_model, "parent": card.parent_version or ""},
        ) as stored:
            card.version = stored.tag.version or ""
            path = Path(stored.path)
            (path / MODEL_SUBDIR).mkdir()
            write(path)
            (path / CARD_FILE).write_text(card.model_dump_json(indent=2))
        logger.info("saved model %s:%s", MODEL_NAME, card.version)
        return self.get(card.version)

    def get(self, version: str) -> ModelVersion:
        """The stored version, or a RegistryError naming the known ones."""
        import bentoml
        from bentoml.exceptions import NotFound

        try:
            stored = bentoml.models.get(f"{MODEL_NAME}:{version}", _model_store=self._store())
        except (NotFound, ValueError) as exc:
            known = ", ".join(v.version for v in self.list()[-5:]) or "none"
            raise RegistryError(f"model version {version!r} not found (latest: {known})") from exc
        path = Path(stored.path)
        card = ModelCard.model_validate_json((path / CARD_FILE).read_text())
        return ModelVersion(version=stored.tag.version or version, path=path, card=card)

    def list(self) -> list[ModelVersion]:
        """All versions, oldest first."""
        import bentoml
        from bentoml.exceptions import NotFound

        try:
            stored_models = bentoml.models.list(MODEL_NAME, _model_store=self._store())
        except NotFound:
            return []
        versions = []
        for stored in stored_models:
            path = Path(stored.path)
            card_path = path / CARD_FILE
            if card_path.is_file():
                versions.append(
                    ModelVersion(
                        version=stored.tag.version or "",
                        path=path,
                        card=ModelCard.model_validate_json(card_path.read_text()),
                    )
                )
        return sorted(versions, key=lambda v: v.card.created_at)

    def _store_path(self) -> Path:
        return self.bentoml_home / "models"

    def _store(self) -> ModelStore:
        # An explicit store, not BentoML's process-wide singleton, so one process can use several homes.
        from bentoml._internal.models import ModelStore

        path = self._store_path()
        path.mkdir(parents=True, exist_ok=True)
        return ModelStore(path)

    def pointer(self) -> ChampionPointer:
        """The champion pointer as stored (empty when nothing was promoted yet)."""
        if not self.pointer_path.is_file():
            return ChampionPointer()
        return ChampionPointer.model_validate_json(self.pointer_path.read_text())

    def champion(self) -> str | None:
        """The version that should serve."""
        return self.pointer().champion

    def champion_version(self) -> ModelVersion:
        """The champion's registry entry, or an error telling the user how to get one."""
        version = self.champion()
        if version is None:
            raise RegistryError("no champion model yet: run `flywheel train --data PATH` first")
        return self.get(version)

    def promote(
        self,
        version: str,
        reason: str = "manual",
        *,
        expected: str | Literal[_Whatever.ANY] | None = ANY_CHAMPION,
        guard: Callable[[], None] | None = None,
    ) -> PointerChange:
        """Make ``version`` the champion: a compare-and-swap of the pointer when ``expected`` names the champion the
        caller saw (None: no champion yet), ChampionChangedError and no change when the pointer names another.

        The model's files and directories are flushed to disk first, so the pointer never names a model a power
        loss could take back. ``guard`` runs under the pointer's lock right before the write; it refuses the
        promotion by raising (the retrain worker checks there that it still holds its lease).
        """
        entry = self.get(version)
        fsync_tree(entry.path, up_to=self._store_path())
        with self.locked() as pointer:
            if expected is not ANY_CHAMPION and pointer.champion != expected:
                raise ChampionChangedError(expected, pointer.champion, version)
            if guard is not None:
                guard()
            change = PointerChange(action="promote", version=version, previous=pointer.champion, reason=reason)
            if pointer.champion != version:
                pointer.stack.append(version)
            pointer.history.append(change)
            self._write(pointer)
        logger.info("champion is now %s (%s)", version, reason)
        return change

    def rollback(self, reason: str = "manual rollback") -> PointerChange:
        """Restore the champion before the current one."""
        with self.locked() as pointer:
            if len(pointer.stack) < 2:
                raise RegistryError("nothing to roll back to: the current champion is the first one promoted")
            current = pointer.stack.pop()
            change = PointerChange(action="rollback", version=pointer.stack[-1], previous=current, reason=reason)
            pointer.history.append(change)
            self._write(pointer)
        logger.info("rolled back champion %s -> %s", change.previous, change.version)
        return change

    @contextmanager
    def locked(self) -> Iterator[ChampionPointer]:
        """Hold the pointer's lock (yielding the pointer as stored): no promotion or rollback happens meanwhile.

        Do not promote or roll back inside the block: the lock is not re-entrant.
        """
        # Two processes promoting at once must not both read the old pointer and lose one change.
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self.pointer()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, pointer: ChampionPointer) -> None:
        atomic_write_text(self.pointer_path, json.dumps(pointer.model_dump(mode="json"), indent=2))
