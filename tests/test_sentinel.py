"""Redis Sentinel: the gateway finds the master through real sentinels and follows it through a failover."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.config import Settings
from app.main import create_redis
from app.sentinel import SentinelTarget
from tests.conftest import (
    ADMIN,
    KEY_PEPPER,
    MASTER_KEY,
    PRIMARY,
    RunningGateway,
    Simulator,
    bearer,
    cli_env,
    redis_gateway_settings,
    run_cli,
    running_gateway,
)
from tests.servers import free_port, start_redis

pytestmark = pytest.mark.anyio
SERVICE = "kgw-primary"  # not the default name, so the setting is what finds it
# Only the password, db and scheme of the URL are used with sentinels: this host does not even resolve.
URL = "redis://master.invalid:6379/0"
Address = tuple[str, int]


@dataclass
class SentinelGroup:
    """A master, its replica and one sentinel watching them, each a redis-server on loopback."""

    master: Address
    replica: Address
    sentinel: Address

    def target(self) -> SentinelTarget:
        return SentinelTarget((self.sentinel,), SERVICE)


@contextlib.contextmanager
def sentinel_group() -> Iterator[SentinelGroup]:
    group = SentinelGroup(("127.0.0.1", free_port()), ("127.0.0.1", free_port()), ("127.0.0.1", free_port()))
    with tempfile.TemporaryDirectory() as workdir, contextlib.ExitStack() as stack:

        def start(name: str, port: int, *args: str) -> None:
            Path(workdir, name).mkdir()
            process = start_redis(port, f"{workdir}/{name}", *args)
            stack.callback(process.wait, timeout=10)
            stack.callback(process.terminate)

        # Nothing on disk; a replica's first sync at once (by default a master waits 5 s for more replicas).
        data = ("--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0")
        start("master", group.master[1], *data)
        start("replica", group.replica[1], *data, "--replicaof", *map(str, group.master))
        # Sentinel rewrites its configuration file, so it gets its own; quorum 1: it decides alone.
        config = Path(workdir, "sentinel.conf")
        config.write_text(f"sentinel monitor {SERVICE} {group.master[0]} {group.master[1]} 1\n")
        start("sentinel", group.sentinel[1], str(config), "--sentinel")
        yield group


@contextlib.asynccontextmanager
async def client(address: Address) -> AsyncIterator[Redis]:
    redis = Redis(host=address[0], port=address[1])
    try:
        yield redis
    finally:
        await redis.aclose()


async def fail_over(group: SentinelGroup) -> Address:
    """Make the sentinel promote the replica once the master's writes have reached it; return the address the
    sentinel announces in `+switch-master`. The old master stays up (a planned failover): Sentinel demotes it
    only about 10 s later, so until then it would take the writes of a client that did not move."""
    async with client(group.master) as master, client(group.sentinel) as sentinel, sentinel.pubsub() as events:
        assert await master.wait(1, 5000) == 1
        await events.subscribe("+switch-master")
        with anyio.fail_after(15):
            while True:
                try:
                    await sentinel.sentinel_failover(SERVICE)
                    break
                except ResponseError as exc:
                    # The sentinel promotes only a replica it has heard from itself, and says nothing when it has.
                    if "NOGOODSLAVE" not in str(exc):
                        raise
                    await asyncio.sleep(0.1)
            async for message in events.listen():
                if message["type"] == "message":
                    name, _, _, host, port = message["data"].decode().split()
                    assert name == SERVICE
                    return host, int(port)
    raise AssertionError("the sentinel's events ended")


class LogHeard(logging.Handler):
    """Sets `event` when a record containing `text` is logged (the gateway runs in this event loop)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@contextlib.contextmanager
def heard_in_log(logger: str, text: str) -> Iterator[asyncio.Event]:
    handler = LogHeard(text)
    logging.getLogger(logger).addHandler(handler)
    try:
        yield handler.event
    finally:
        logging.getLogger(logger).removeHandler(handler)


async def generate(gateway: RunningGateway, api_key: str, prompt: str) -> str:
    response = await gateway.http.post(
        f"{gateway.url}/generate", json={"prompt": prompt, "wait_seconds": 10}, headers=bearer(api_key)
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    task_id: str = response.json()["task_id"]
    return task_id


async def holds(address: Address, text: str) -> bool:
    async with client(address) as redis:
        return any([key async for key in redis.scan_iter(match=f"*{text}*")])


async def test_the_gateway_follows_the_master_through_a_sentinel_failover(simulator: Simulator) -> None:
    with sentinel_group() as group:
        settings = redis_gateway_settings(
            simulator, URL, redis_sentinels=[group.sentinel], redis_sentinel_service=SERVICE
        )
        async with running_gateway(settings) as gateway:
            url, http = gateway.url, gateway.http
            first_key = await gateway.new_api_key("acme")
            first_task = await generate(gateway, first_key, "a lighthouse at dawn")
            assert await holds(group.master, first_task)

            with heard_in_log("app.sentinel", f"Redis master {SERVICE} is now") as moved:
                new_master = await fail_over(group)
                assert new_master == group.replica
                with anyio.fail_after(5):
                    await moved.wait()

            # A key written before the failover is looked up on the new master, and new writes land there, not on
            # the old master that still accepts them.
            second_task = await generate(gateway, first_key, "a lighthouse at dusk")
            assert await holds(new_master, second_task)
            assert not await holds(group.master, second_task)
            shown = await http.get(f"{url}/tasks/{first_task}", headers=bearer(first_key))
            assert shown.status_code == 200, shown.text

            # The CLI's admin verbs find the new master too: a key it issues works on the gateway at once.
            body = {"name": "globex", "kling": {"access_key": PRIMARY.access_key, "secret_key": PRIMARY.secret_key}}
            tenant = (await http.post(f"{url}/admin/tenants", json=body, headers=ADMIN)).json()["id"]
            env = cli_env(
                KGW_REDIS_URL=URL, KGW_REDIS_SENTINELS=f"{group.sentinel[0]}:{group.sentinel[1]}",
                KGW_REDIS_SENTINEL_SERVICE=SERVICE, KGW_KEY_PEPPER=KEY_PEPPER, KGW_MASTER_KEY=MASTER_KEY,
            )  # fmt: skip
            code, issued, err = await run_cli("keys", "issue", tenant, "--label", "after failover", env=env)
            assert code == 0, err
            await generate(gateway, issued.strip(), "a lighthouse at night")

            # Pub/sub (key changes, task updates) subscribed again on the new master. Nothing announces that:
            # ask until it shows, briefly.
            async with client(new_master) as redis:
                with anyio.fail_after(5):
                    while len(await redis.pubsub_channels()) < 2:  # noqa: ASYNC110 - Redis state is the observation
                        await asyncio.sleep(0.05)


async def test_connections_to_a_demoted_master_reconnect_to_the_new_one() -> None:
    """Without the gateway's switch listener (the CLI, or a switch announced while no sentinel was reachable),
    connections still move on their first error; the retry settings decide whether a command sees it."""
    with sentinel_group() as group:
        retrying = create_redis(URL, sentinel=group.target())
        limiter = create_redis(URL, retries=0, sentinel=group.target())
        try:
            await retrying.set("before", "1")
            await limiter.ping()
            new_master = await fail_over(group)
            async with client(group.master) as old_master:
                await old_master.replicaof(*new_master)  # what Sentinel does to the old master ~10 s later
            errors = REGISTRY.get_sample_value("kgw_redis_errors_total", {"kind": "connection"}) or 0.0

            # READONLY from the demoted master: the client that retries reconnects through the sentinel and
            # succeeds; the limiter's, which never retries, fails this once (counted) and then works.
            await retrying.set("after", "1")
            with pytest.raises(RedisConnectionError):
                await limiter.set("limit", "1")
            assert REGISTRY.get_sample_value("kgw_redis_errors_total", {"kind": "connection"}) == errors + 1
            await limiter.set("limit", "1")
            async with client(new_master) as redis:
                assert await redis.mget("before", "after", "limit") == [b"1", b"1", b"1"]
        finally:
            await retrying.aclose()
            await limiter.aclose()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"redis_sentinels": "127.0.0.1:26379"}, "KGW_REDIS_SENTINELS needs a redis:// or rediss:// KGW_REDIS_URL"),
        ({"redis_url": URL, "redis_sentinels": "sentinel-a"}, "'sentinel-a' is not host:port"),
        ({"redis_url": URL, "redis_sentinels": "sentinel-a:0"}, "'sentinel-a:0' is not host:port"),
    ],
)
def test_sentinel_settings_are_checked(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.model_validate(values)


def test_sentinels_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KGW_REDIS_URL", "rediss://:secret@ignored:6380/2")
    monkeypatch.setenv("KGW_REDIS_SENTINELS", "sentinel-a:26379, [fd00::1]:26380")
    settings = Settings()
    assert settings.redis_sentinels == [("sentinel-a", 26379), ("fd00::1", 26380)]
    assert settings.redis_sentinel_service == "mymaster"
