"""Access control: the admin token and the API keys."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from flywheel.settings.core import FlywheelSettings


class AccessSettings(FlywheelSettings):
    """Access control."""

    admin_token: SecretStr | None = Field(
        None, description="Bearer token for admin endpoints (POST /retrain, /drift/run); unset = they are disabled."
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [], description="Comma-separated API keys; when set, /predict and /feedback need header `X-API-Key`."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value
