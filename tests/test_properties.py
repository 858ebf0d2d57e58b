"""Property tests (hypothesis): the reference-URL guard and the argument model hold for whole input spaces."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.errors import invalid_request_from
from app.kling import build_generation_body
from app.models import GenerateRequest, check_reference_url
from app.ratelimit import MemoryLimiter, TenantLimits, utc_day

INTERNAL_NETWORKS = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                     "100.64.0.0/10", "0.0.0.0/8"]  # fmt: skip
KLING_FIELDS = {"model_name", "prompt", "negative_prompt", "image", "image_reference", "image_fidelity",
                "human_fidelity", "resolution", "n", "aspect_ratio", "callback_url", "external_task_id"}  # fmt: skip


def spellings(address: ipaddress.IPv4Address) -> list[str]:
    """Ways a resolver reads the same IPv4 address."""
    number = int(address)
    return [str(address), str(number), hex(number), f"[::ffff:{address}]", ".".join(f"0{o:o}" for o in address.packed)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(INTERNAL_NETWORKS).flatmap(lambda net: st.ip_addresses(network=net)))
def test_no_spelling_of_an_internal_ipv4_address_passes_the_reference_url_guard(address: Any) -> None:
    assert isinstance(address, ipaddress.IPv4Address)
    for host in spellings(address):
        with pytest.raises(ValueError, match=r"."):
            check_reference_url(f"https://{host}/cat.png")


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=6))
def test_no_ipv6_literal_passes_the_reference_url_guard(address: Any) -> None:
    with pytest.raises(ValueError, match=r"."):
        check_reference_url(f"https://[{address}]/cat.png")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-20, 5000) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=8,
)
argument_names = st.sampled_from([*sorted(GenerateRequest.model_fields), "num_images", "model", "extra"])


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(argument_names, json_values, max_size=8))
def test_any_arguments_are_either_refused_naming_a_field_or_mapped_to_documented_kling_fields(
    arguments: dict[str, Any],
) -> None:
    try:
        request = GenerateRequest.model_validate(arguments)
    except ValidationError as exc:
        refused_field = invalid_request_from(exc.errors()).details["field"]
    else:
        refused_field = None
    if refused_field is not None:
        assert refused_field
        return
    body = build_generation_body(request, external_task_id="kgw-x")
    assert set(body) <= KLING_FIELDS
    assert 1 <= body["n"] <= 9
    assert 1 <= len(body["prompt"]) <= 2500
    assert not ("image" in body and "negative_prompt" in body)


@settings(max_examples=300, deadline=None)
@given(now=st.floats(min_value=0, max_value=1e9, allow_nan=False), per_minute=st.integers(1, 100_000))
def test_a_tenants_first_request_is_admitted_whatever_the_clock_reads(now: float, per_minute: int) -> None:
    """The in-memory limiter counts in float seconds of a monotonic clock (hours since boot on a fresh machine):
    rounding must never refuse a request the limit allows (a 1/min tenant was refused its first one)."""
    limiter = MemoryLimiter(lease_ttl_s=60, clock=lambda: now)
    remaining = asyncio.run(limiter.admit_request("t_1", "k_1", TenantLimits(requests_per_minute=per_minute)))
    assert remaining.requests_this_minute == per_minute - 1


@settings(max_examples=300, deadline=None)
@given(now=st.floats(min_value=0, max_value=4e9, allow_nan=False))
@example(now=86_399.9999996)  # half a microsecond before midnight: a datetime would round it into the next day
def test_images_are_counted_on_the_utc_day_a_calendar_gives_for_any_instant(now: float) -> None:
    """Daily image quotas are kept per UTC day by name, worked out from POSIX days rather than a calendar per call:
    the name must be the calendar's for every instant, midnights included."""
    midnight = float(int(now) - int(now) % 86_400)
    for instant in (now, midnight, midnight - 1e-3):
        if instant >= 0:
            assert utc_day(instant) == time.strftime("%Y-%m-%d", time.gmtime(instant))
