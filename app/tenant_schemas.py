"""A tenant's policy and limits, and its name, as administrators write them: one schema for the admin API and
the tenants file, so a file can set nothing the API would refuse."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

from app.models import canonical_model_name, read_unambiguously
from app.ratelimit import TenantLimits
from app.tenants import TenantPolicy

TenantName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")]


def check_kling_base_url(value: str | None) -> str | None:
    """An http(s) URL of a host (and maybe a path), without a trailing slash; None (or empty) for the gateway's
    KGW_KLING_BASE_URL."""
    if not value:
        return None
    parts = read_unambiguously(value)  # a port every Kling call could parse, among the rest
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http(s) URL, such as https://api-beijing.klingai.com")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("must not hold credentials, a query or a fragment")
    return value.rstrip("/")


_STATIC_KEY = re.compile(r"^[\x21-\x7e]{8,512}$")


def check_static_api_key(value: str) -> str:
    """A static API key as Kling's console shows it: printable ASCII without spaces, since it goes into an HTTP
    header as it is (a stray newline from a file or a paste would make every call fail, and the error name the key)."""
    key = value.strip()
    if not _STATIC_KEY.match(key):
        raise ValueError("must be 8 to 512 printable ASCII characters without spaces")
    return key


def _check_static_api_key_secret(value: SecretStr) -> SecretStr:
    return SecretStr(check_static_api_key(value.get_secret_value()))


StaticApiKey = Annotated[SecretStr, AfterValidator(_check_static_api_key_secret)]
KlingBaseUrl = Annotated[
    Annotated[str, Field(max_length=256)] | None,
    AfterValidator(check_kling_base_url),
    Field(description="The account's Kling API, when not the gateway's KGW_KLING_BASE_URL: "
          "https://api-beijing.klingai.com for an account of Kling's China site"),
]  # fmt: skip


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allowed_models: list[str] | None = Field(default=None, description="None: every image model")
    default_model: str | None = None
    max_images_per_request: Annotated[int, Field(ge=1, le=9)] = 9
    max_wait_seconds: Annotated[int | None, Field(ge=0)] = None

    @field_validator("allowed_models")
    @classmethod
    def _models(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [canonical_model_name(model) for model in value]

    @field_validator("default_model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return None if value is None else canonical_model_name(value)

    def policy(self) -> TenantPolicy:
        models = tuple(self.allowed_models) if self.allowed_models is not None else None
        return TenantPolicy(models, self.default_model, self.max_images_per_request, self.max_wait_seconds)


class LimitsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: Annotated[int, Field(ge=1, le=1_000_000)] = 60
    requests_per_minute_per_key: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    concurrent_tasks: Annotated[int, Field(ge=1, le=100_000)] = 10
    images_per_day: Annotated[int, Field(ge=1, le=100_000_000)] = 1000

    def limits(self) -> TenantLimits:
        return TenantLimits(**self.model_dump())
