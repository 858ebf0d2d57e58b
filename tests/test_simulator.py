"""Behaviour of the local Kling simulator, exercised over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import jwt
import pytest
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.simulator import SimAccount, SimulatorConfig, create_simulator_app

pytestmark = pytest.mark.anyio

DELAY = 0.2
ACME = SimAccount("ak-acme", "acme-secret-0123456789abcdef0123456789", concurrency=3)
OTHER = SimAccount("ak-other", "other-secret-0123456789abcdef012345678", concurrency=5)


def token(account: SimAccount, *, exp: float = 1800, nbf: float = -5, key: str | None = None) -> str:
    now = int(time.time())
    claims = {"iss": account.access_key, "exp": now + exp, "nbf": now + nbf}
    return jwt.encode(claims, key or account.secret_key, algorithm="HS256", headers={"typ": "JWT"})


def auth(account: SimAccount = ACME) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(account)}"}


@contextlib.asynccontextmanager
async def serve(app: Starlette, host: str = "127.0.0.1") -> AsyncIterator[str]:
    # An explicit IPPROTO_TCP: with proto 0 asyncio skips TCP_NODELAY, and every keep-alive request then
    # waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(5):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes no startup event
                await asyncio.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # Module scope, so that the one simulator below can outlive each test.
    return "asyncio"


@pytest.fixture(scope="module")
async def sim_url() -> AsyncIterator[str]:
    # One server for the module (start and stop cost ~0.3 s); each test starts from /_sim/reset.
    async with serve(create_simulator_app(SimulatorConfig(accounts=(ACME, OTHER), delay=DELAY))) as base_url:
        yield base_url


@pytest.fixture
async def sim(sim_url: str) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=sim_url) as client:
        await control(client, "reset")
        yield client


async def create(client: httpx2.AsyncClient, account: SimAccount = ACME, **body: Any) -> httpx2.Response:
    return await client.post("/v1/images/generations", json={"prompt": "a red fox", **body}, headers=auth(account))


async def wait_terminal(client: httpx2.AsyncClient, task_id: str) -> dict[str, Any]:
    with anyio.fail_after(5):
        while True:
            response = await client.get(f"/v1/images/generations/{task_id}", headers=auth())
            data: dict[str, Any] = response.json()["data"]
            if data["task_status"] in ("succeed", "failed"):
                return data
            await anyio.sleep(DELAY / 10)


async def control(client: httpx2.AsyncClient, what: str, **body: Any) -> None:
    response = await client.post(f"/_sim/{what}", json=body)
    assert response.json() == {"ok": True}


# --- auth ---


async def test_missing_authorization_answers_401_code_1001(sim: httpx2.AsyncClient) -> None:
    response = await sim.post("/v1/images/generations", json={"prompt": "x"})
    assert (response.status_code, response.json()["code"]) == (401, 1001)


@pytest.mark.parametrize(
    "bearer",
    [
        "not-a-jwt",
        token(ACME, key="wrong-secret-0123456789abcdef0123456789"),
        token(SimAccount("ak-unknown", ACME.secret_key)),
        jwt.encode({"iss": ACME.access_key, "exp": int(time.time()) + 600, "nbf": 0}, "", algorithm="none"),
    ],
    ids=["garbage", "wrong-signature", "unknown-issuer", "alg-none"],
)
async def test_invalid_tokens_answer_401_code_1002(sim: httpx2.AsyncClient, bearer: str) -> None:
    response = await sim.get("/v1/images/generations", headers={"Authorization": f"Bearer {bearer}"})
    assert (response.status_code, response.json()["code"]) == (401, 1002)


async def test_token_not_yet_valid_answers_1003(sim: httpx2.AsyncClient) -> None:
    response = await sim.get("/v1/images/generations", headers={"Authorization": f"Bearer {token(ACME, nbf=300)}"})
    assert (response.status_code, response.json()["code"]) == (401, 1003)


async def test_expired_token_answers_1004(sim: httpx2.AsyncClient) -> None:
    bearer = token(ACME, exp=-60, nbf=-120)
    response = await sim.get("/v1/images/generations", headers={"Authorization": f"Bearer {bearer}"})
    assert (response.status_code, response.json()["code"]) == (401, 1004)


async def test_a_token_accepted_before_is_refused_once_it_expires(sim: httpx2.AsyncClient) -> None:
    """The simulator checks a token's signature once and remembers it, but still checks its times on each use."""
    bearer = token(ACME, exp=2)
    expires = jwt.decode(bearer, options={"verify_signature": False})["exp"]
    headers = {"Authorization": f"Bearer {bearer}"}
    assert (await sim.get("/v1/images/generations", headers=headers)).json()["code"] == 0
    await anyio.sleep(max(0.0, expires - time.time()) + 0.05)  # a time, not an event: at most 2 s
    response = await sim.get("/v1/images/generations", headers=headers)
    assert (response.status_code, response.json()["code"]) == (401, 1004)


async def test_a_token_accepted_before_is_refused_once_its_account_has_a_new_secret(sim: httpx2.AsyncClient) -> None:
    rotated = SimAccount("ak-rotated", "rotated-secret-0123456789abcdef012345678", concurrency=1)
    await control(sim, "accounts", access_key=rotated.access_key, secret_key=rotated.secret_key, concurrency=1)
    headers = auth(rotated)
    assert (await sim.get("/v1/images/generations", headers=headers)).json()["code"] == 0
    await control(sim, "accounts", access_key=rotated.access_key, secret_key="new-" + rotated.secret_key, concurrency=1)
    response = await sim.get("/v1/images/generations", headers=headers)
    assert (response.status_code, response.json()["code"]) == (401, 1002)


# --- validation ---


async def test_unknown_field_answers_1201_naming_it(sim: httpx2.AsyncClient) -> None:
    response = await create(sim, num_images=2)
    body = response.json()
    assert (response.status_code, body["code"]) == (400, 1201)
    assert "num_images" in body["message"]


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("prompt", {"prompt": ""}),
        ("prompt", {"prompt": "x" * 2501}),
        ("n", {"n": 10}),
        ("n", {"n": True}),
        ("aspect_ratio", {"aspect_ratio": "21:9", "model_name": "kling-v1"}),
        ("aspect_ratio", {"aspect_ratio": "5:4"}),
        ("resolution", {"resolution": "4k"}),
        ("negative_prompt", {"image": "https://example.com/a.png", "negative_prompt": "blur"}),
        ("image", {"image": "data:image/png;base64,iVBORw0KGgo="}),
        ("image_reference", {"image_reference": "subject"}),
        ("human_fidelity", {"image": "iVBORw0KGgo=", "image_reference": "face", "human_fidelity": 0.5}),
        ("image_fidelity", {"image": "https://example.com/a.png", "image_fidelity": 1.5}),
        ("watermark_info", {"watermark_info": {"enabled": "yes"}}),
        ("callback_url", {"callback_url": "ftp://example.com/hook"}),
    ],
)
async def test_invalid_values_answer_1201_naming_the_field(
    sim: httpx2.AsyncClient, field: str, body: dict[str, Any]
) -> None:
    response = await create(sim, **body)
    assert (response.status_code, response.json()["code"]) == (400, 1201)
    assert field in response.json()["message"]


async def test_valid_image_to_image_request_is_accepted(sim: httpx2.AsyncClient) -> None:
    body: dict[str, Any] = {
        "image": "iVBORw0KGgo=",
        "image_reference": "subject",
        "human_fidelity": 0,
        "model_name": "kling-v1-5",
    }
    response = await create(sim, **body, image_fidelity=1, watermark_info={"enabled": True}, aspect_ratio="21:9")
    assert response.json()["code"] == 0


async def test_unknown_model_answers_404_code_1203_naming_it(sim: httpx2.AsyncClient) -> None:
    response = await create(sim, model_name="kling-v2-master")
    assert (response.status_code, response.json()["code"]) == (404, 1203)
    assert "kling-v2-master" in response.json()["message"]


async def test_malformed_json_body_answers_1200(sim: httpx2.AsyncClient) -> None:
    response = await sim.post("/v1/images/generations", content=b"{nope", headers=auth())
    assert (response.status_code, response.json()["code"]) == (400, 1200)


async def test_unknown_path_answers_spring_404_without_envelope(sim: httpx2.AsyncClient) -> None:
    response = await sim.post("/v1/images/generation", json={"prompt": "x"}, headers=auth())
    body = response.json()
    assert response.status_code == 404
    assert (body["status"], body["error"], body["path"]) == (404, "Not Found", "/v1/images/generation")
    assert "code" not in body


# --- lifecycle, images, slots ---


async def test_task_goes_through_lifecycle_and_serves_pngs(sim: httpx2.AsyncClient) -> None:
    created = (await create(sim, n=2, aspect_ratio="16:9")).json()
    assert (created["code"], created["message"], created["data"]["task_status"]) == (0, "SUCCEED", "submitted")
    task_id = created["data"]["task_id"]
    first = (await sim.get(f"/v1/images/generations/{task_id}", headers=auth())).json()["data"]
    assert first["task_status"] in ("submitted", "processing")
    assert "images" not in first["task_result"]

    data = await wait_terminal(sim, task_id)
    assert (data["task_status"], data["final_unit_deduction"]) == ("succeed", "2")
    assert data["updated_at"] >= data["created_at"] > 1_000_000_000_000  # Unix milliseconds
    images = data["task_result"]["images"]
    assert [image["index"] for image in images] == [0, 1]
    for url in (images[1]["url"], images[1]["watermark_url"]):
        assert url.startswith(str(sim.base_url))
        response = await sim.get(url)
        assert response.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(response.content)).size == (512, 288)


async def test_2k_images_are_larger(sim: httpx2.AsyncClient) -> None:
    task_id = (await create(sim, resolution="2k", aspect_ratio="1:1")).json()["data"]["task_id"]
    url = (await wait_terminal(sim, task_id))["task_result"]["images"][0]["url"]
    assert Image.open(io.BytesIO((await sim.get(url)).content)).size == (1024, 1024)


async def test_unknown_image_is_plain_404(sim: httpx2.AsyncClient) -> None:
    task_id = (await create(sim)).json()["data"]["task_id"]
    await wait_terminal(sim, task_id)
    for path in ("/images/nope/0.png", f"/images/{task_id}/1.png", f"/images/{task_id}/x.png"):
        assert (await sim.get(path)).status_code == 404


async def test_slots_over_concurrency_answer_1303_until_the_task_ends(sim: httpx2.AsyncClient) -> None:
    assert (await create(sim, n=2)).json()["code"] == 0
    rejected = await create(sim, n=2)
    assert (rejected.status_code, rejected.json()) == (
        429,
        {
            "code": 1303,
            "message": "parallel task over resource pack limit",
            "request_id": rejected.json()["request_id"],
        },
    )
    assert (await create(sim, n=1)).json()["code"] == 0
    assert (await sim.get("/_sim/stats")).json()["in_flight"][ACME.access_key] == 3
    await anyio.sleep(DELAY * 1.2)  # nobody polls: the slots must free themselves when the time is up
    assert (await create(sim, n=3)).json()["code"] == 0
    assert (await sim.get("/_sim/stats")).json()["rejected_1303"] == 1


async def test_concurrent_creates_never_exceed_the_limit(sim: httpx2.AsyncClient) -> None:
    codes: list[int] = []

    async def one() -> None:
        codes.append((await create(sim, OTHER)).json()["code"])

    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(one)
    assert sorted(codes) == [0] * 5 + [1303] * 7


async def test_external_task_id_is_unique_and_queryable(sim: httpx2.AsyncClient) -> None:
    created = (await create(sim, external_task_id="job-1")).json()["data"]
    assert created["task_info"] == {"external_task_id": "job-1"}
    duplicate = await create(sim, external_task_id="job-1")
    assert (duplicate.status_code, duplicate.json()["code"]) == (400, 1201)
    assert duplicate.json()["message"] == "external_task_id already exists"
    found = (await sim.get("/v1/images/generations/job-1", headers=auth())).json()["data"]
    assert found["task_id"] == created["task_id"]
    assert (await sim.get("/_sim/stats")).json()["creates"] == 1
    assert (await create(sim, OTHER, external_task_id="job-1")).json()["code"] == 0  # unique per account only


async def test_another_accounts_task_is_not_found(sim: httpx2.AsyncClient) -> None:
    task_id = (await create(sim, external_task_id="mine")).json()["data"]["task_id"]
    for ident in (task_id, "mine"):
        response = await sim.get(f"/v1/images/generations/{ident}", headers=auth(OTHER))
        assert (response.status_code, response.json()["code"]) == (404, 1203)


async def test_list_is_newest_first_and_validates_paging(sim: httpx2.AsyncClient) -> None:
    ids = [(await create(sim)).json()["data"]["task_id"] for _ in range(3)]
    await create(sim, OTHER)
    page = await sim.get("/v1/images/generations", params={"pageNum": 1, "pageSize": 2}, headers=auth())
    assert [task["task_id"] for task in page.json()["data"]] == ids[::-1][:2]
    rest = await sim.get("/v1/images/generations", params={"pageNum": 2, "pageSize": 2}, headers=auth())
    assert [task["task_id"] for task in rest.json()["data"]] == ids[:1]
    for params in ({"pageNum": 0}, {"pageSize": 501}, {"pageNum": "x"}):
        bad = await sim.get("/v1/images/generations", params=params, headers=auth())
        assert (bad.status_code, bad.json()["code"]) == (400, 1201)


# --- callbacks ---


@contextlib.asynccontextmanager
async def callback_receiver(until: str) -> AsyncIterator[tuple[str, list[dict[str, Any]], anyio.Event]]:
    received: list[dict[str, Any]] = []
    done = anyio.Event()

    async def hook(request: Request) -> Response:
        received.append(await request.json())
        if received[-1]["task_status"] == until:
            done.set()
        return JSONResponse({"ok": True})

    async with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as base_url:
        yield f"{base_url}/hook", received, done


async def test_callbacks_post_each_status_change(sim: httpx2.AsyncClient) -> None:
    async with callback_receiver(until="succeed") as (url, received, done):
        task_id = (await create(sim, callback_url=url, external_task_id="cb")).json()["data"]["task_id"]
        with anyio.fail_after(5):
            await done.wait()
    assert [body["task_status"] for body in received] == ["processing", "succeed"]
    assert received[-1]["task_id"] == task_id
    assert received[-1]["task_info"] == {"external_task_id": "cb"}
    assert len(received[-1]["task_result"]["images"]) == 1
    assert (await sim.get("/_sim/stats")).json()["callbacks_sent"] == 2


async def test_unreachable_callback_is_counted_as_failed(sim: httpx2.AsyncClient) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
        await create(sim, callback_url=url)
        with anyio.fail_after(5):
            while (await sim.get("/_sim/stats")).json()["callbacks_failed"] < 2:  # noqa: ASYNC110 - counters only
                await anyio.sleep(DELAY / 4)


# --- control surface ---


async def test_fault_answers_the_scripted_error_then_stops(sim: httpx2.AsyncClient) -> None:
    await control(sim, "faults", code=1302, message="too fast", times=1, path="create")
    assert (await sim.get("/v1/images/generations", headers=auth())).json()["code"] == 0  # query unaffected
    faulted = await create(sim)
    assert (faulted.status_code, faulted.json()["code"], faulted.json()["message"]) == (429, 1302, "too fast")
    assert (await create(sim)).json()["code"] == 0
    assert (await sim.get("/_sim/stats")).json()["creates"] == 1


async def test_fault_1303_counts_as_rejected_and_defaults_its_status(sim: httpx2.AsyncClient) -> None:
    await control(sim, "faults", code=1303)
    response = await sim.get("/v1/images/generations", headers=auth())
    assert (response.status_code, response.json()["code"]) == (429, 1303)
    assert (await sim.get("/_sim/stats")).json()["rejected_1303"] == 1


async def test_faults_apply_only_after_auth(sim: httpx2.AsyncClient) -> None:
    await control(sim, "faults", code=5001, path="any")
    assert (await sim.get("/v1/images/generations")).json()["code"] == 1001
    response = await sim.get("/v1/images/generations", headers=auth())
    assert (response.status_code, response.json()["code"]) == (503, 5001)


async def test_slow_delays_the_next_matching_answer(sim: httpx2.AsyncClient) -> None:
    await control(sim, "slow", seconds=0.3, times=1, path="query")
    started = time.monotonic()
    assert (await sim.get("/v1/images/generations", headers=auth())).json()["code"] == 0
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    await sim.get("/v1/images/generations", headers=auth())
    assert time.monotonic() - started < 0.3


async def test_malformed_answers_200_with_non_json(sim: httpx2.AsyncClient) -> None:
    await control(sim, "malformed", times=1, path="query")
    response = await sim.get("/v1/images/generations", headers=auth())
    assert response.status_code == 200
    with pytest.raises(ValueError, match="Expecting value"):
        response.json()
    assert (await sim.get("/v1/images/generations", headers=auth())).json()["code"] == 0


async def test_outcome_makes_the_next_task_fail_and_frees_its_slots(sim: httpx2.AsyncClient) -> None:
    await control(sim, "outcomes", status="failed", message="content risk control", times=1)
    task_id = (await create(sim, n=3)).json()["data"]["task_id"]
    data = await wait_terminal(sim, task_id)
    assert (data["task_status"], data["task_status_msg"], data["task_result"]) == (
        "failed",
        "content risk control",
        {},
    )
    assert (await sim.get(f"/images/{task_id}/0.png")).status_code == 404
    second = (await create(sim, n=3)).json()["data"]["task_id"]
    assert (await wait_terminal(sim, second))["task_status"] == "succeed"


async def test_accounts_can_be_added_at_run_time(sim: httpx2.AsyncClient) -> None:
    late = SimAccount("ak-late", "late-secret-0123456789abcdef0123456789a", concurrency=1)
    assert (await create(sim, late)).json()["code"] == 1002
    await control(sim, "accounts", access_key=late.access_key, secret_key=late.secret_key, concurrency=1)
    assert (await create(sim, late)).json()["code"] == 0
    assert (await create(sim, late)).json()["code"] == 1303


async def test_stats_count_and_reset_forgets_everything_but_accounts(sim: httpx2.AsyncClient) -> None:
    task_id = (await create(sim, n=2)).json()["data"]["task_id"]
    await sim.get(f"/v1/images/generations/{task_id}", headers=auth())
    await sim.get("/v1/images/generations?pageNum=1&pageSize=5", headers=auth())
    await control(sim, "faults", code=1302)
    stats = (await sim.get("/_sim/stats")).json()
    assert stats | {"in_flight": None} == {
        "creates": 1,
        "create_attempts": 1,
        "queries": 2,  # a list call is a status read too
        "lists": 1,
        "rejected_1303": 0,
        "in_flight": None,
        "callbacks_sent": 0,
        "callbacks_failed": 0,
    }
    assert (stats["in_flight"][ACME.access_key], stats["in_flight"][OTHER.access_key]) == (2, 0)
    await control(sim, "reset")
    after = (await sim.get("/_sim/stats")).json()
    assert (after["creates"], after["queries"], after["in_flight"][ACME.access_key]) == (0, 0, 0)
    assert (await sim.get(f"/v1/images/generations/{task_id}", headers=auth())).json()["code"] == 1203


async def test_bad_control_input_answers_400(sim: httpx2.AsyncClient) -> None:
    for what, body in (("faults", {"code": "x"}), ("slow", {"seconds": -1}), ("outcomes", {"status": "odd"})):
        response = await sim.post(f"/_sim/{what}", json=body)
        assert response.status_code == 400
        assert "error" in response.json()


async def test_finish_ends_running_tasks_in_creation_order_calling_a_submitted_one_back_once_at_its_end() -> None:
    # A simulator whose tasks would take an hour: only `finish` can end them within the test's bound.
    app = create_simulator_app(SimulatorConfig(accounts=(ACME,), delay=3600))
    async with (
        serve(app) as base_url,
        httpx2.AsyncClient(base_url=base_url) as slow,
        callback_receiver(until="succeed") as (url, received, done),
    ):
        first = (await create(slow, callback_url=url)).json()["data"]["task_id"]
        second = (await create(slow)).json()["data"]["task_id"]
        await control(slow, "finish", within_s=0.2)
        with anyio.fail_after(5):
            await done.wait()
            ended = [await wait_terminal(slow, task_id) for task_id in (first, second)]
    assert [data["task_status"] for data in ended] == ["succeed", "succeed"]
    assert ended[0]["updated_at"] <= ended[1]["updated_at"]
    assert [body["task_status"] for body in received] == ["succeed"]


async def test_finish_refuses_a_negative_window(sim: httpx2.AsyncClient) -> None:
    response = await sim.post("/_sim/finish", json={"within_s": -1})
    assert response.status_code == 400
    assert "within_s" in response.json()["error"]
