"""The admin API: who may use it, and what it shows (never a secret after issuing)."""

from __future__ import annotations

import pytest

from tests.conftest import ADMIN, PRIMARY, RunningGateway, Simulator, bearer, gateway_settings, running_gateway

pytestmark = pytest.mark.anyio


async def test_a_tenant_key_cannot_use_the_admin_api(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    response = await gateway.http.get(f"{gateway.url}/admin/tenants", headers=bearer(api_key))
    assert response.status_code == 403


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}])
async def test_the_admin_api_needs_the_admin_token(gateway: RunningGateway, headers: dict[str, str]) -> None:
    response = await gateway.http.get(f"{gateway.url}/admin/tenants", headers=headers)
    assert response.status_code == 401


async def test_tenants_and_keys_are_listed_without_secrets(gateway: RunningGateway) -> None:
    api_key = await gateway.new_api_key("acme")
    tenants = (await gateway.http.get(f"{gateway.url}/admin/tenants", headers=ADMIN)).json()
    assert [tenant["name"] for tenant in tenants] == ["acme"]
    assert PRIMARY.secret_key not in str(tenants)
    keys = (await gateway.http.get(f"{gateway.url}/admin/tenants/{tenants[0]['id']}/keys", headers=ADMIN)).json()
    assert [key["key_id"] for key in keys] == [api_key.split("_")[1]]
    assert api_key not in str(keys)


async def test_a_duplicate_tenant_name_is_409_and_bad_input_422(gateway: RunningGateway) -> None:
    await gateway.new_api_key("acme")
    body = {"name": "acme", "kling": {"access_key": "a", "secret_key": "b"}}
    assert (await gateway.http.post(f"{gateway.url}/admin/tenants", json=body, headers=ADMIN)).status_code == 409
    missing = await gateway.http.post(f"{gateway.url}/admin/tenants", json={"name": "x"}, headers=ADMIN)
    assert missing.status_code == 422
    assert missing.json()["error"]["field"] == "kling"


async def test_issuing_for_an_unknown_tenant_is_404(gateway: RunningGateway) -> None:
    response = await gateway.http.post(f"{gateway.url}/admin/tenants/t_missing/keys", json={}, headers=ADMIN)
    assert response.status_code == 404


async def test_without_an_admin_token_the_admin_api_does_not_exist(simulator: Simulator) -> None:
    async with running_gateway(gateway_settings(simulator, admin_token=None)) as running:
        response = await running.http.get(f"{running.url}/admin/tenants", headers=ADMIN)
    assert response.status_code == 404
