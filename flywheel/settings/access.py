"""Access control: the admin token and the API keys."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from flywheel.settings.core import FlywheelSettings


class AccessSettings(FlywheelSettings):
    """Access control."""

    admin_token: SecretStr | None = Field(
        None,
        description="Bootstrap admin: `Authorization: Bearer <token>` acts as the admin `admin-token` (it alone does "
        "not make keys required); unset = only admin keys act as admins.",
    )
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        [],
        description="Comma-separated API keys of `client` principals (`env-key-1`, ...); any key, here or created "
        "with `flywheel keys create`, makes every protected route need header `X-API-Key`.",
    )
    session_secret: SecretStr | None = Field(
        None,
        description="Secret signing browser session cookies; unset = a random one kept in `<home>/secrets/` (set it "
        "when replicas do not share a home).",
    )
    auth: bool = Field(
        True,
        description="`off` lets `flywheel serve` bind a non-loopback address while no key exists (every caller is "
        "then an anonymous client with reviewer reads); keep it on outside a trusted network.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value
