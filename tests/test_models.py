"""Validation of the generate_image arguments (GenerateRequest): pure and synchronous."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from app.errors import InvalidRequest, invalid_request_from
from app.models import (
    ACCEPTED_MODEL_NAMES,
    IMAGE_MODELS,
    GenerateRequest,
    canonical_model_name,
    check_reference_base64,
    check_reference_url,
)


def image_base64(width: int = 400, height: int = 400, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


PNG = image_base64()
JPEG = image_base64(image_format="JPEG")


def refusal(arguments: dict[str, Any]) -> InvalidRequest:
    """The caller-facing error for arguments GenerateRequest must refuse."""
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate(arguments)
    return invalid_request_from(caught.value.errors())


# --- each documented rule refuses bad input and names the argument to fix ---

REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("prompt-missing", {}, "prompt"),
    ("prompt-empty", {"prompt": ""}, "prompt"),
    ("prompt-blank", {"prompt": " \t\n "}, "prompt"),
    ("prompt-2501-chars", {"prompt": "x" * 2501}, "prompt"),
    ("prompt-not-a-string", {"prompt": 42}, "prompt"),
    ("negative-prompt-2501-chars", {"prompt": "a fox", "negative_prompt": "x" * 2501}, "negative_prompt"),
    (
        "negative-prompt-with-reference-image",
        {"prompt": "a fox", "negative_prompt": "blur", "ref_image_url": PNG},
        "negative_prompt",
    ),
    ("num-images-0", {"prompt": "a fox", "num_images": 0}, "num_images"),
    ("num-images-10", {"prompt": "a fox", "num_images": 10}, "num_images"),
    ("num-images-string", {"prompt": "a fox", "num_images": "3"}, "num_images"),
    ("num-images-bool", {"prompt": "a fox", "num_images": True}, "num_images"),
    ("num-images-float", {"prompt": "a fox", "num_images": 2.0}, "num_images"),
    ("aspect-ratio-5:4", {"prompt": "a fox", "aspect_ratio": "5:4"}, "aspect_ratio"),
    ("aspect-ratio-16x9", {"prompt": "a fox", "aspect_ratio": "16x9"}, "aspect_ratio"),
    (
        "aspect-ratio-21:9-on-kling-v1",
        {"prompt": "a fox", "model_name": "kling-v1", "aspect_ratio": "21:9"},
        "aspect_ratio",
    ),
    (
        "ref-image-weight-below-0",
        {"prompt": "a fox", "model_name": "kling-v1", "ref_image_url": PNG, "ref_image_weight": -0.1},
        "ref_image_weight",
    ),
    (
        "ref-image-weight-above-1",
        {"prompt": "a fox", "model_name": "kling-v1", "ref_image_url": PNG, "ref_image_weight": 1.1},
        "ref_image_weight",
    ),
    ("ref-image-weight-without-image", {"prompt": "a fox", "ref_image_weight": 0.5}, "ref_image_weight"),
    (
        "human-fidelity-below-0",
        {
            "prompt": "a fox",
            "model_name": "kling-v2-1",
            "ref_image_url": PNG,
            "image_reference": "subject",
            "human_fidelity": -0.01,
        },
        "human_fidelity",
    ),
    (
        "human-fidelity-above-1",
        {
            "prompt": "a fox",
            "model_name": "kling-v2-1",
            "ref_image_url": PNG,
            "image_reference": "subject",
            "human_fidelity": 1.01,
        },
        "human_fidelity",
    ),
    (
        "human-fidelity-with-face-reference",
        {
            "prompt": "a fox",
            "model_name": "kling-v2-1",
            "ref_image_url": PNG,
            "image_reference": "face",
            "human_fidelity": 0.5,
        },
        "human_fidelity",
    ),
    (
        "human-fidelity-without-image-reference",
        {"prompt": "a fox", "model_name": "kling-v2-1", "ref_image_url": PNG, "human_fidelity": 0.5},
        "human_fidelity",
    ),
    (
        "human-fidelity-on-kling-v3",
        {"prompt": "a fox", "ref_image_url": PNG, "image_reference": "subject", "human_fidelity": 0.5},
        "human_fidelity",
    ),
    (
        "human-fidelity-on-kling-v1",
        {
            "prompt": "a fox",
            "model_name": "kling-v1",
            "ref_image_url": PNG,
            "image_reference": "subject",
            "human_fidelity": 0.5,
        },
        "human_fidelity",
    ),
    ("image-reference-without-image", {"prompt": "a fox", "image_reference": "subject"}, "image_reference"),
    (
        "image-reference-unknown-value",
        {"prompt": "a fox", "ref_image_url": PNG, "image_reference": "body"},
        "image_reference",
    ),
    (
        "kling-v1-5-image-without-image-reference",
        {"prompt": "a fox", "model_name": "kling-v1-5", "ref_image_url": PNG},
        "image_reference",
    ),
    ("kling-v2-new-without-image", {"prompt": "restyle it", "model_name": "kling-v2-new"}, "ref_image_url"),
    ("unknown-argument", {"prompt": "a fox", "cfg_scale": 0.8}, "cfg_scale"),
    ("seed-argument-model", {"prompt": "a fox", "model": "kling-v1"}, "model"),
    ("unknown-model", {"prompt": "a fox", "model_name": "kling-v9"}, "model_name"),
    ("empty-model", {"prompt": "a fox", "model_name": ""}, "model_name"),
    ("resolution-4k", {"prompt": "a fox", "resolution": "4k"}, "resolution"),
    ("wait-seconds-negative", {"prompt": "a fox", "wait_seconds": -1}, "wait_seconds"),
    ("idempotency-key-empty", {"prompt": "a fox", "idempotency_key": ""}, "idempotency_key"),
    ("idempotency-key-256-chars", {"prompt": "a fox", "idempotency_key": "k" * 256}, "idempotency_key"),
    ("idempotency-key-with-space", {"prompt": "a fox", "idempotency_key": "order 42"}, "idempotency_key"),
    ("idempotency-key-non-ascii", {"prompt": "a fox", "idempotency_key": "clé-42"}, "idempotency_key"),
]


@pytest.mark.parametrize(("arguments", "field"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_arguments_breaking_a_documented_rule_are_refused_naming_the_argument(
    arguments: dict[str, Any], field: str
) -> None:
    error = refusal(arguments)
    assert (error.status, error.type) == (422, "invalid_request")
    assert error.details["field"] == field


@pytest.mark.parametrize(
    "model_name", ["kling-v1.6", "kling-v1-6", "kling-v2-1-master", "kling-v2.5-turbo", "kling-v2-6"]
)
def test_a_video_model_is_refused_with_a_message_saying_it_is_a_video_model(model_name: str) -> None:
    error = refusal({"prompt": "a fox", "model_name": model_name})
    assert error.details["field"] == "model_name"
    assert "video model" in error.message


def test_an_unknown_model_is_refused_listing_the_image_models() -> None:
    error = refusal({"prompt": "a fox", "model_name": "dall-e-3"})
    assert error.details["field"] == "model_name"
    assert "video model" not in error.message
    assert all(name in error.message for name in IMAGE_MODELS)


# --- ref_image_url: https URLs to public hosts, or base64 images ---


@pytest.mark.parametrize(
    "url",
    [
        "/etc/passwd",
        "./x.png",
        "../x.png",
        "~/x.png",
        "file:///etc/passwd",
        "file:/etc/passwd",
        "ftp://example.com/fox.png",
        "gopher://example.com/_fox",
        "data://example.com/fox.png",
        "https://user:pass@example.com/fox.png",
        "https://user@example.com/fox.png",
        "https:///fox.png",
        "https://localhost/fox.png",
        "https://localhost./fox.png",
        "https://app.localhost/fox.png",
        "https://metadata.google.internal/computeMetadata/v1/",
        "https://db.internal/fox.png",
        "https://printer.local/fox.png",
        "https://10.0.0.5/fox.png",
        "https://172.16.0.1/fox.png",
        "https://192.168.1.1/fox.png",
        "https://100.64.0.1/fox.png",
        "https://127.0.0.1/fox.png",
        "https://127.0.0.1:8443/fox.png",
        "https://0.0.0.0/fox.png",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/fox.png",
        "https://[::]/fox.png",
        "https://[fe80::1]/fox.png",
        "https://[fd00:ec2::254]/latest/meta-data/",
        "https://[::ffff:127.0.0.1]/fox.png",
        "https://93.184.216.34/fox.png",  # IP literals are refused even when public: Kling gets host names
        "https://[2606:2800:220:1:248:1893:25c8:1946]/fox.png",
        "https://intranet/fox.png",
        "https://example.com/" + "a" * 2048,
    ],
)
def test_a_reference_url_that_is_not_a_public_https_url_is_refused(url: str) -> None:
    error = refusal({"prompt": "a fox", "ref_image_url": url})
    assert error.details["field"] == "ref_image_url"
    with pytest.raises(ValueError, match=r"."):
        check_reference_url(url)


@pytest.mark.parametrize("url", ["https://2130706433/", "https://0x7f000001/", "https://0177.0.0.1/", "https://127.1/"])
def test_a_loopback_address_written_in_another_ipv4_notation_is_refused(url: str) -> None:
    error = refusal({"prompt": "a fox", "ref_image_url": url})
    assert error.details["field"] == "ref_image_url"


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/fox.png",
        "https://cdn.example.com:8443/images/fox.jpg?size=large#top",
    ],
)
def test_a_public_https_reference_url_is_accepted_unchanged(url: str) -> None:
    request = GenerateRequest(prompt="a fox", ref_image_url=url)
    assert request.ref_image_url == url


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PNG, PNG),
        (f"data:image/png;base64,{PNG}", PNG),
        (f"data:image/jpeg;base64,{JPEG}", JPEG),
        (f"DATA:IMAGE/JPG;BASE64,{JPEG}", JPEG),
        (image_base64(300, 750), image_base64(300, 750)),
        (image_base64(750, 300), image_base64(750, 300)),
        (JPEG, JPEG),
        (image_base64(750, 300, "JPEG"), image_base64(750, 300, "JPEG")),
    ],
    ids=["png", "png-data-uri", "jpeg-data-uri", "uppercase-data-uri", "png-1:2.5", "png-2.5:1", "jpeg", "jpeg-2.5:1"],
)
def test_a_base64_png_or_jpeg_within_klings_limits_is_accepted_without_a_data_prefix(data: str, expected: str) -> None:
    request = GenerateRequest(prompt="a fox", ref_image_url=data)
    assert request.ref_image_url == expected
    assert check_reference_base64(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        "not base64 at all!",
        "abc",
        "aGVsbG8gd29ybGQ=",  # base64 of b"hello world": not an image
        base64.b64encode(b"GIF89a" + b"\0" * 64).decode(),
        base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode(),  # a PNG signature, no image
        "data:text/plain;base64,aGVsbG8=",
        image_base64(400, 400, "GIF"),
        image_base64(299, 400),
        image_base64(400, 299, "JPEG"),
        image_base64(100, 100),
        image_base64(300, 751),
        image_base64(1000, 300, "JPEG"),
    ],
    ids=[
        "garbage",
        "bad-padding",
        "text-bytes",
        "gif-bytes",
        "png-signature-only",
        "text-data-uri",
        "gif-image",
        "png-299-wide",
        "jpeg-299-high",
        "png-100x100",
        "png-beyond-1:2.5",
        "jpeg-beyond-2.5:1",
    ],
)
def test_base64_that_is_not_a_png_or_jpeg_within_klings_limits_is_refused(data: str) -> None:
    error = refusal({"prompt": "a fox", "ref_image_url": data})
    assert error.details["field"] == "ref_image_url"
    with pytest.raises(ValueError, match=r"."):
        check_reference_base64(data)


def test_an_empty_reference_image_means_no_reference_image() -> None:
    request = GenerateRequest(prompt="a fox", negative_prompt="blur", ref_image_url="")
    assert (request.ref_image_url, request.negative_prompt) == (None, "blur")


# --- accepted combinations ---


def test_defaults_are_kling_v3_at_16_9_with_one_image() -> None:
    request = GenerateRequest(prompt="a fox")
    assert (request.model_name, request.aspect_ratio, request.num_images) == ("kling-v3", "16:9", 1)
    assert request.negative_prompt is None
    assert request.ref_image_url is None
    assert request.ref_image_weight is None
    assert request.image_reference is None
    assert request.human_fidelity is None
    assert request.resolution is None
    assert request.idempotency_key is None


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("kling-v1", "kling-v1"),
        ("kling-v1-5", "kling-v1-5"),
        ("kling-v1.5", "kling-v1-5"),
        ("kling-v2", "kling-v2"),
        ("kling-v2-master", "kling-v2"),
        ("kling-v2-new", "kling-v2-new"),
        ("kling-v2-1", "kling-v2-1"),
        ("kling-v2.1", "kling-v2-1"),
        ("kling-v3", "kling-v3"),
        ("KLING-V1.5", "kling-v1-5"),
        ("Kling-V2-Master", "kling-v2"),
        ("  kling-v2.1  ", "kling-v2-1"),
    ],
)
def test_an_accepted_model_name_normalises_to_a_kling_image_model(name: str, canonical: str) -> None:
    assert canonical_model_name(name) == canonical
    request = GenerateRequest.model_validate({"prompt": "a fox", "model_name": name, "ref_image_url": PNG,
                                              "image_reference": "subject"})  # fmt: skip
    assert request.model_name == canonical


@pytest.mark.parametrize("name", ACCEPTED_MODEL_NAMES)
def test_every_model_name_the_schema_advertises_is_accepted(name: str) -> None:
    assert canonical_model_name(name) in IMAGE_MODELS


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("prompt-2500-chars", {"prompt": "x" * 2500}),
    ("negative-prompt-2500-chars", {"prompt": "a fox", "negative_prompt": "x" * 2500}),
    ("num-images-9", {"prompt": "a fox", "num_images": 9}),
    ("21:9-on-kling-v3", {"prompt": "a fox", "aspect_ratio": "21:9"}),
    ("kling-v1-at-2:3", {"prompt": "a fox", "model_name": "kling-v1", "aspect_ratio": "2:3"}),
    (
        "weight-0-on-kling-v1",
        {"prompt": "a fox", "model_name": "kling-v1", "ref_image_url": PNG, "ref_image_weight": 0},
    ),
    (
        "kling-v1-5-subject-with-human-fidelity",
        {
            "prompt": "a fox",
            "model_name": "kling-v1.5",
            "ref_image_url": PNG,
            "image_reference": "subject",
            "ref_image_weight": 1,
            "human_fidelity": 1,
        },
    ),
    (
        "kling-v2-1-subject-with-human-fidelity-0",
        {
            "prompt": "a fox",
            "model_name": "kling-v2-1",
            "ref_image_url": f"data:image/jpeg;base64,{JPEG}",
            "image_reference": "subject",
            "human_fidelity": 0,
        },
    ),
    (
        "kling-v1-5-face",
        {"prompt": "a fox", "model_name": "kling-v1-5", "ref_image_url": PNG, "image_reference": "face"},
    ),
    ("kling-v2-new-with-image", {"prompt": "restyle", "model_name": "kling-v2-new", "ref_image_url": PNG}),
    ("weight-ignored-by-kling-v3", {"prompt": "a fox", "ref_image_url": PNG, "ref_image_weight": 0.5}),
    ("resolution-2k", {"prompt": "a fox", "resolution": "2k"}),
    ("wait-seconds-3600", {"prompt": "a fox", "wait_seconds": 3600}),
    ("idempotency-key-255-printable", {"prompt": "a fox", "idempotency_key": "!~" + "k" * 253}),
]


@pytest.mark.parametrize("arguments", [case[1] for case in ACCEPTED], ids=[case[0] for case in ACCEPTED])
def test_arguments_within_the_documented_rules_are_accepted(arguments: dict[str, Any]) -> None:
    request = GenerateRequest.model_validate(arguments)
    assert request.combination_problems() == []


@pytest.mark.parametrize("aspect_ratio", ["16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9"])
def test_each_of_the_eight_aspect_ratios_is_accepted(aspect_ratio: str) -> None:
    assert (
        GenerateRequest.model_validate({"prompt": "a fox", "aspect_ratio": aspect_ratio}).aspect_ratio == aspect_ratio
    )


def test_surrounding_whitespace_is_stripped_from_text_arguments() -> None:
    request = GenerateRequest(prompt="  a fox  ", negative_prompt=" blur ", idempotency_key=" key-1 ")
    assert (request.prompt, request.negative_prompt, request.idempotency_key) == ("a fox", "blur", "key-1")


def test_a_blank_negative_prompt_means_no_negative_prompt() -> None:
    assert GenerateRequest(prompt="a fox", negative_prompt="   ").negative_prompt is None


def test_a_png_header_claiming_gigantic_dimensions_is_refused_without_decoding() -> None:
    header = (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    )
    chunk = header + struct.pack(">I", zlib.crc32(header[12:]) & 0xFFFFFFFF)
    bomb = base64.b64encode(chunk + b"\0\0\0\0IEND\xaeB`\x82").decode()
    error = refusal({"prompt": "a fox", "ref_image_url": bomb})
    assert error.details["field"] == "ref_image_url"


@pytest.mark.parametrize(
    "url",
    [
        "https://169.254.169.254\\.example.com/a.png",  # a browser-style parser reads the host as 169.254.169.254
        "https://169.254.169%2E254/a.png",  # and decodes escapes in a host
        "https://127.0.0.1%2e/a.png",
        "https://example.com\\@127.0.0.1/a.png",
        "https://exa\tmple.com/a.png",  # tabs and newlines are dropped by such a parser, wherever they are
        "https://example.com:99999/a.png",  # no such port
        "https://example.com:0/a.png",
    ],
)
def test_a_reference_url_that_another_url_parser_could_read_as_another_host_is_refused(url: str) -> None:
    assert refusal({"prompt": "a fox", "ref_image_url": url}).details["field"] == "ref_image_url"


@pytest.mark.parametrize(
    "url", ["https://example.com:99999/hook", "https://exa%6Dple.com/hook", "https://a.com\\@b.com/"]
)
def test_a_webhook_url_that_is_not_one_unambiguous_host_is_refused(url: str) -> None:
    assert refusal({"prompt": "a fox", "webhook_url": url}).details["field"] == "webhook_url"


@pytest.mark.parametrize(
    "url", ["https://１２７.０.０.１/x.png", "https://127。0。0.1/x.png", "https://a.ｌｏｃａｌｈｏｓｔ/x.png"]
)
def test_full_width_and_ideographic_spellings_of_internal_hosts_are_refused(url: str) -> None:
    assert refusal({"prompt": "a fox", "ref_image_url": url}).details["field"] == "ref_image_url"
