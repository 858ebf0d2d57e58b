"""Per-request webhooks: the final result is posted to the caller's `webhook_url`, signed with the tenant's
webhook secret (checked here with the Standard Webhooks reference library), and retried until it lands."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import pytest
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.errors import InvalidRequest
from app.references import ReferenceGuard
from app.webhooks import Pinning, pinned
from tests.conftest import ADMIN, RunningGateway, Simulator, bearer, gateway_settings, running_gateway
from tests.servers import serve

pytestmark = pytest.mark.anyio


@dataclass
class Receiver:
    """A caller's webhook endpoint that fails its first `failures` deliveries with 503."""

    url: str = ""
    failures: int = 1
    deliveries: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: anyio.Event = field(default_factory=anyio.Event)

    async def hook(self, request: Request) -> Response:
        self.deliveries.append((dict(request.headers), await request.body()))
        if len(self.deliveries) <= self.failures:
            return Response(status_code=503)
        self.accepted.set()
        return Response(status_code=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    async with serve(Starlette(routes=[Route("/hook", receiver.hook, methods=["POST"])])) as url:
        receiver.url = f"{url}/hook"
        yield receiver


@pytest.fixture
async def hooked_gateway(simulator: Simulator) -> AsyncIterator[RunningGateway]:
    """A gateway whose operator lets webhooks reach loopback (where the test receiver listens)."""
    async with running_gateway(gateway_settings(simulator, webhook_allowed_hosts=["127.0.0.1"])) as running:
        yield running


async def _tenant_with_secret(gateway: RunningGateway) -> tuple[dict[str, str], str]:
    api_key = await gateway.new_api_key("acme")
    tenants = (await gateway.http.get(f"{gateway.url}/admin/tenants", headers=ADMIN)).json()
    tenant_id = next(tenant["id"] for tenant in tenants if tenant["name"] == "acme")
    created = await gateway.http.post(f"{gateway.url}/admin/tenants/{tenant_id}/webhook-secret", headers=ADMIN)
    assert created.status_code == 201, created.text
    return bearer(api_key), created.json()["webhook_secret"]


async def test_the_final_result_reaches_the_webhook_signed_and_retried(
    hooked_gateway: RunningGateway, receiver: Receiver
) -> None:
    headers, secret = await _tenant_with_secret(hooked_gateway)
    body = {"prompt": "a lighthouse", "webhook_url": receiver.url}
    response = await hooked_gateway.http.post(f"{hooked_gateway.url}/generate", json=body, headers=headers)
    assert response.status_code == 202, response.text
    with anyio.fail_after(15):
        await receiver.accepted.wait()
    (first_headers, _), (last_headers, last_body) = receiver.deliveries
    assert first_headers["webhook-id"] == last_headers["webhook-id"]  # a retry is the same message
    payload = Webhook(secret).verify(last_body, last_headers)
    assert payload["type"] == "image.task.succeeded"
    assert payload["data"]["task_id"] == response.json()["task_id"]
    assert payload["data"]["images"]
    assert secret not in last_body.decode()


async def test_a_webhook_url_needs_the_tenants_secret_and_nothing_is_created_without(
    hooked_gateway: RunningGateway, receiver: Receiver, simulator: Simulator
) -> None:
    headers = bearer(await hooked_gateway.new_api_key("acme"))
    body = {"prompt": "x", "webhook_url": receiver.url}
    response = await hooked_gateway.http.post(f"{hooked_gateway.url}/generate", json=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "webhook_url"
    assert (await simulator.stats())["creates"] == 0


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "https://127.0.0.1:9/hook", "https://169.254.169.254/latest", "file:///x"]
)
async def test_private_or_plain_webhook_urls_are_refused_before_anything_is_sent(
    gateway: RunningGateway, simulator: Simulator, url: str
) -> None:
    headers, _ = await _tenant_with_secret(gateway)
    response = await gateway.http.post(f"{gateway.url}/generate", json={"prompt": "x", "webhook_url": url},
                                       headers=headers)  # fmt: skip
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "webhook_url"
    assert (await simulator.stats())["creates"] == 0


async def test_a_receiver_is_reached_at_the_address_that_was_checked_not_by_resolving_again() -> None:
    answers = {"hooks.example.com": ["93.184.216.34"], "rebound.example.com": ["10.0.0.7"]}

    async def resolver(host: str) -> list[str]:  # what DNS answers at the moment of the check
        return answers[host]

    guard = ReferenceGuard(resolver=resolver, webhook_hosts=frozenset({"hooks.internal"}))
    address = await guard.check_webhook("https://hooks.example.com/x")
    assert address == "93.184.216.34"
    target, pinning = pinned("https://hooks.example.com/x?token=1", address)
    # Connect to the checked address; the Host header and TLS name (so the certificate check) stay the name's.
    assert target == "https://93.184.216.34/x?token=1"
    assert pinning.headers == {"host": "hooks.example.com"}
    assert pinning.extensions == {"sni_hostname": "hooks.example.com"}
    with pytest.raises(InvalidRequest):
        await guard.check_webhook("https://rebound.example.com/x")
    assert await guard.check_webhook("http://hooks.internal:8080/x") is None  # the operator's own receiver
    assert pinned("http://hooks.internal:8080/x", None) == ("http://hooks.internal:8080/x", Pinning({}, {}))
