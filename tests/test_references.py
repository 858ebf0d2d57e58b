"""ReferenceGuard: http only when allowed, and no reference host that resolves to a non-public address."""

from __future__ import annotations

import socket

import pytest

from app.errors import InvalidRequest
from app.references import ReferenceGuard, is_public_address
from tests.conftest import RunningGateway, Simulator, bearer, gateway_settings, running_gateway

pytestmark = pytest.mark.anyio


def resolving_to(*addresses: str) -> ReferenceGuard:
    async def resolve(host: str) -> list[str]:
        return list(addresses)

    return ReferenceGuard(resolver=resolve)


@pytest.mark.parametrize(
    "address",
    ["10.1.2.3", "127.0.0.1", "169.254.169.254", "192.168.0.1", "100.64.1.1", "::1", "fd00:ec2::254",
     "fe80::1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "2002:a00:1::", "224.0.0.1",
     "0.0.0.0",  # noqa: S104 - an address to refuse, not to bind
     # Python 3.11 before 3.11.10 calls these global: local-use NAT64 (RFC 8215) and IPv4-compatible addresses.
     "64:ff9b:1::a9fe:a9fe", "::a9fe:a9fe", "::7f00:1", "::808:808"],
)  # fmt: skip
async def test_a_host_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await resolving_to("93.184.216.34", address).check("https://images.example.com/cat.png")
    assert caught.value.details["field"] == "ref_image_url"


async def test_a_host_resolving_only_to_public_addresses_passes() -> None:
    await resolving_to("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946").check("https://example.com/cat.png")
    assert is_public_address("8.8.8.8")


async def test_a_name_that_does_not_resolve_here_is_left_to_kling() -> None:
    async def unresolvable(host: str) -> list[str]:
        raise socket.gaierror("no such name")

    await ReferenceGuard(resolver=unresolvable).check("https://nowhere.example/cat.png")


async def test_inline_image_data_needs_no_lookup() -> None:
    await resolving_to("10.0.0.1").check("iVBORw0KGgo=")
    await resolving_to("10.0.0.1").check(None)


async def test_http_references_are_refused_unless_the_operator_allows_them(
    gateway: RunningGateway, simulator: Simulator
) -> None:
    headers = bearer(await gateway.new_api_key("acme"))
    body = {"prompt": "a cat", "ref_image_url": "http://images.example.com/cat.png"}
    refused = await gateway.http.post(f"{gateway.url}/generate", json=body, headers=headers)
    assert (refused.status_code, refused.json()["error"]["field"]) == (422, "ref_image_url")
    assert (await simulator.stats())["create_attempts"] == 0

    async with running_gateway(gateway_settings(simulator, allow_http_references=True)) as allowing:
        headers = bearer(await allowing.new_api_key("acme"))
        accepted = await allowing.http.post(f"{allowing.url}/generate", json=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
