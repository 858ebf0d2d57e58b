"""Request and result schemas shared by REST and MCP.

`GenerateRequest` keeps the seed server's argument names (`num_images`, `ref_image_url`,
`ref_image_weight`) so existing prompts keep working, and checks every documented Kling rule before
anything is sent upstream (reference/kling-api.md §4). `app.kling` maps it onto Kling's fields.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import re
import socket
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal
from urllib.parse import SplitResult, urlsplit

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AspectRatio = Literal["16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9"]
ImageReference = Literal["subject", "face"]
Resolution = Literal["1k", "2k"]

DEFAULT_MODEL = "kling-v3"
MAX_PROMPT_CHARS = 2500
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MIN_IMAGE_SIDE = 300
MAX_IMAGE_ASPECT = 2.5
IMAGE_URL_LIFETIME_DAYS = 30


@dataclass(frozen=True)
class ModelRules:
    """What one Kling image model accepts. Kling's docs moved these between versions; they live here only."""

    image_fidelity: bool = False
    human_fidelity: bool = False
    wide_21_9: bool = True
    needs_image: bool = False
    image_needs_reference: bool = False


IMAGE_MODELS: dict[str, ModelRules] = {
    "kling-v1": ModelRules(image_fidelity=True, wide_21_9=False),
    "kling-v1-5": ModelRules(image_fidelity=True, human_fidelity=True, image_needs_reference=True),
    "kling-v2": ModelRules(),
    "kling-v2-new": ModelRules(needs_image=True),
    "kling-v2-1": ModelRules(image_fidelity=True, human_fidelity=True),
    "kling-v3": ModelRules(),
}
# Names the seed server (and its users' prompts) used that clearly mean one documented image model.
MODEL_ALIASES = {"kling-v2-master": "kling-v2"}
VIDEO_MODELS = {"kling-v1-6", "kling-v2-1-master", "kling-v2-5-turbo", "kling-v2-6"}
ACCEPTED_MODEL_NAMES = [*IMAGE_MODELS, "kling-v1.5", "kling-v2.1", *MODEL_ALIASES]

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_DATA_URI_RE = re.compile(r"^data:image/(png|jpeg|jpg);base64,", re.IGNORECASE)
_BLOCKED_HOSTNAMES = {"localhost", "metadata", "metadata.google.internal", "instance-data"}
_INTERNAL_SUFFIXES = (".localhost", ".internal", ".local", ".lan", ".home.arpa", ".intranet", ".corp")
MAX_URL_CHARS = 2048


def canonical_model_name(name: str) -> str:
    """`kling-v1.5` -> `kling-v1-5`, `kling-v2-master` -> `kling-v2`; raises ValueError for non-image models."""
    normalized = name.strip().lower().replace(".", "-")
    normalized = MODEL_ALIASES.get(normalized, normalized)
    if normalized in IMAGE_MODELS:
        return normalized
    known = ", ".join(IMAGE_MODELS)
    if normalized in VIDEO_MODELS or "master" in normalized or "turbo" in normalized:
        raise ValueError(f"{name!r} is a Kling video model; image models are: {known}")
    raise ValueError(f"unknown model {name!r}; image models are: {known}")


def check_reference_url(url: str) -> str:
    """Accept an https URL on a public host name; refuse other schemes, credentials, IP literals and internal names.

    The gateway never fetches the URL itself; Kling does. Refusing internal names and IP literals (in every
    notation: `127.1` and `0x7f000001` are loopback too) still matters: Kling must only be pointed at the
    public internet, and a name is what an operator can audit.
    """
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"URL is longer than {MAX_URL_CHARS} characters")
    parts = read_unambiguously(url)
    if parts.scheme not in ("https", "http"):  # http is refused later unless the operator allows it
        raise ValueError("must be an https:// URL or base64 image data (local paths and other schemes are refused)")
    if parts.username or parts.password:
        raise ValueError("must not contain credentials")
    try:
        # Normalised as a resolver would: full-width digits and ideographic dots become ASCII here.
        host = (parts.hostname or "").encode("idna").decode("ascii").rstrip(".").lower()
    except UnicodeError as exc:
        raise ValueError("has a host name that is not valid") from exc
    if not host:
        raise ValueError("has no host")
    if _is_ip_literal(host):
        raise ValueError(f"host {host!r} is an IP address; use the public host name of the image")
    if host in _BLOCKED_HOSTNAMES or host.endswith(_INTERNAL_SUFFIXES) or "." not in host:
        raise ValueError(f"host {host!r} is not a public internet host")
    return url


def read_unambiguously(url: str) -> SplitResult:
    """The URL's parts, once sure that no other URL parser reads another host in it. Python's parser and the
    WHATWG one (browsers, Node, and whatever fetches at Kling) differ: WHATWG reads a backslash as a slash,
    decodes escapes in a host name and drops tabs and newlines anywhere, so `https://169.254.169.254\\.a.com/`
    is a host of a.com here and the metadata address there."""
    if "\\" in url or any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise ValueError("must not contain backslashes, spaces or control characters (escape them with %XX)")
    parts = urlsplit(url)
    if "%" in parts.netloc:
        raise ValueError("must not escape characters in its host name (nor before it)")
    try:
        port = parts.port  # a ValueError when out of range or not a number
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("has a port that is not a number from 1 to 65535")
    return parts


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    try:
        socket.inet_aton(host)  # the legacy forms resolvers still accept: 127.1, 0x7f000001, 2130706433
    except OSError:
        return False
    return True


def check_reference_base64(data: str) -> str:
    """Raw base64 (a `data:` prefix is stripped): a PNG or JPEG within Kling's size and shape limits."""
    data = _DATA_URI_RE.sub("", data.strip(), count=1)
    if not _BASE64_RE.match(data):
        raise ValueError("must be an https:// URL or base64 image data")
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise ValueError("is not valid base64") from exc
    if len(raw) > MAX_IMAGE_BYTES:
        raise ValueError("image is larger than 10 MB")
    if not raw.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")):
        raise ValueError("image must be PNG or JPEG")
    try:
        with warnings.catch_warnings():
            # Only the header is read; a header claiming a gigantic image is refused, not decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as image:
                width, height = image.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ValueError("image dimensions are implausibly large") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError("image data cannot be decoded") from exc
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"image is {width}x{height}; each side must be at least {MIN_IMAGE_SIDE} px")
    if max(width, height) / min(width, height) > MAX_IMAGE_ASPECT:
        raise ValueError(f"image is {width}x{height}; its aspect ratio must be between 1:2.5 and 2.5:1")
    return data


# One type per tool argument, shared by `GenerateRequest` and the MCP tool's signature, so both edges
# publish the same schema and descriptions.
Prompt = Annotated[
    str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw (1-2500 characters).")
]
NegativePrompt = Annotated[
    str | None,
    Field(max_length=MAX_PROMPT_CHARS, description="What to avoid. Not allowed together with ref_image_url."),
]
ModelName = Annotated[
    str,
    Field(
        description=f"Kling image model (default {DEFAULT_MODEL}). Dotted names such as kling-v1.5 are accepted.",
        json_schema_extra={"enum": ACCEPTED_MODEL_NAMES},
    ),
]
AspectRatioArg = Annotated[AspectRatio, Field(description="Image aspect ratio (default 16:9).")]
NumImages = Annotated[int, Field(ge=1, le=9, strict=True, description="How many images to generate (1-9).")]
RefImageUrl = Annotated[
    str | None,
    Field(
        max_length=14_000_000,
        description="Reference image: an https:// URL, or base64 PNG/JPEG data. Never a local path.",
    ),
]
RefImageWeight = Annotated[
    float | None,
    Field(
        ge=0,
        le=1,
        description="How closely to follow the reference image (0-1). Used by kling-v1, kling-v1-5 "
        "and kling-v2-1; other models ignore it.",
    ),
]
ImageReferenceArg = Annotated[
    ImageReference | None,
    Field(description="With ref_image_url: 'subject' keeps the subject, 'face' keeps one face."),
]
HumanFidelity = Annotated[
    float | None,
    Field(ge=0, le=1, description="With image_reference='subject': how closely to keep the person (0-1)."),
]
ResolutionArg = Annotated[Resolution | None, Field(description="Output resolution: 1k (default) or 2k.")]
WaitSeconds = Annotated[
    int | None,
    Field(ge=0, le=3600, description="How long to wait for the images before returning the task id."),
]
IdempotencyKey = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string you choose for this request. When you retry the same request, send the "
        "same key: the gateway returns the task it already started instead of paying for a second one.",
    ),
]

WebhookUrl = Annotated[
    str | None,
    Field(
        max_length=MAX_URL_CHARS,
        description="REST only: an https:// URL that receives the final result, signed (Standard Webhooks) with "
        "your tenant's webhook secret, retried with backoff until it answers 2xx.",
    ),
]


class GenerateRequest(BaseModel):
    """The `generate_image` arguments, for both `POST /generate` and the MCP tool."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: Prompt
    negative_prompt: NegativePrompt = None
    model_name: ModelName = DEFAULT_MODEL
    aspect_ratio: AspectRatioArg = "16:9"
    num_images: NumImages = 1
    ref_image_url: RefImageUrl = None
    ref_image_weight: RefImageWeight = None
    image_reference: ImageReferenceArg = None
    human_fidelity: HumanFidelity = None
    resolution: ResolutionArg = None
    wait_seconds: WaitSeconds = None
    idempotency_key: IdempotencyKey = None
    webhook_url: WebhookUrl = None

    @field_validator("model_name")
    @classmethod
    def _canonical_model(cls, value: str) -> str:
        return canonical_model_name(value)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _empty_negative_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("ref_image_url")
    @classmethod
    def _reference_image(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if value[:5].lower() == "data:" or (len(value) % 4 == 0 and _BASE64_RE.match(value)):
            # Checked first: raw base64 of every JPEG starts with "/9j/", which looks like a path.
            return check_reference_base64(value)
        if "://" in value or value.lower().startswith("file:"):
            return check_reference_url(value)
        raise ValueError("must be an https:// URL or base64 image data (local paths are refused)")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = read_unambiguously(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an https:// URL")
        if parts.username or parts.password:
            raise ValueError("must not contain credentials")
        return value

    @model_validator(mode="after")
    def _documented_combinations(self) -> GenerateRequest:
        problems = self.combination_problems()
        if problems:
            raise FieldProblem(*problems[0])
        return self

    def combination_problems(self) -> list[tuple[str, str]]:
        rules = IMAGE_MODELS[self.model_name]
        has_image = self.ref_image_url is not None
        checks = [
            ("negative_prompt", has_image and self.negative_prompt is not None, "is not allowed with ref_image_url"),
            ("image_reference", self.image_reference is not None and not has_image, "requires ref_image_url"),
            ("ref_image_weight", self.ref_image_weight is not None and not has_image, "requires ref_image_url"),
            ("human_fidelity", self.human_fidelity is not None and self.image_reference != "subject",
             "requires image_reference='subject'"),
            ("human_fidelity", self.human_fidelity is not None and not rules.human_fidelity,
             f"is not supported by {self.model_name}"),
            ("ref_image_url", rules.needs_image and not has_image, f"is required by {self.model_name}"),
            ("image_reference", rules.image_needs_reference and has_image and self.image_reference is None,
             f"is required by {self.model_name} when ref_image_url is given"),
            ("aspect_ratio", self.aspect_ratio == "21:9" and not rules.wide_21_9,
             f"21:9 is not supported by {self.model_name}"),
        ]  # fmt: skip
        return [(name, message) for name, failed, message in checks if failed]


class FieldProblem(ValueError):
    """A cross-field rule failed. Pydantic reports model-level errors without a location, so the edges
    read `field` from the error's context to name the argument to fix."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name} {problem}")
        self.field = field_name


class TaskStatus(StrEnum):
    SUBMITTED = "submitted"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED)


class ImageView(BaseModel):
    index: int
    url: str


class TaskView(BaseModel):
    """What REST returns and what MCP puts in structured content."""

    task_id: str
    status: TaskStatus
    status_message: str | None = None
    model_name: str
    num_images: int
    images: list[ImageView] = Field(default_factory=list)
    created_at: datetime
    updated_at: datetime
    images_expire_at: datetime | None = Field(
        default=None, description="Kling deletes the images after 30 days: download them before this time."
    )
    quota: dict[str, int] | None = Field(
        default=None,
        description="What the caller's tenant has left: requests_this_minute, concurrent_tasks, images_today.",
    )


def datetime_from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
