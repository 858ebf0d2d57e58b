"""The `kling-gateway` command: serve, demo, simulator, tenant and key administration, and a client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import uvicorn
from pydantic import ValidationError

from app.client import generate_and_download
from app.config import Settings
from app.demo import run_demo
from app.errors import GatewayError
from app.logs import logging_config
from app.main import ConfigurationError, Stores, admin_directory, apply_file, open_redis, open_stores
from app.metrics import prepare_multiprocess_dir
from app.sealing import SealingError, new_master_key
from app.simulator import SimAccount, SimulatorConfig, serve_simulator
from app.tenant_schemas import check_kling_base_url, check_static_api_key
from app.tenants import TenantDirectory, TenantPolicy
from app.tenants_file import TenantsFileError

T = TypeVar("T")

Command = Callable[[argparse.Namespace], int]


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit(f"invalid KGW_* settings:\n{exc}") from exc


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    try:
        # Build once in the parent so a bad configuration fails here, with a clear message.
        open_stores(settings, open_redis(settings))
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if settings.redis_url is None and args.workers > 1:
        print("error: --workers > 1 needs KGW_REDIS_URL (the memory store lives in one process)", file=sys.stderr)
        return 2
    if args.workers > 1 and settings.legacy_sse:
        # A legacy SSE session lives in the worker that opened it, and the kernel hands its POSTs to any worker.
        print("note: the legacy /sse transport is off with --workers > 1 (clients use /mcp); run one worker per "
              "replica to keep it", file=sys.stderr)  # fmt: skip
        os.environ["KGW_LEGACY_SSE"] = "false"
    # Workers are spawned, so they see the metrics directory set here before they build their metrics.
    metrics_dir, made_here = prepare_multiprocess_dir() if args.workers > 1 else (None, False)
    try:
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            proxy_headers=True,
            timeout_graceful_shutdown=settings.max_wait_seconds + 5,
            ws="none",
            log_config=logging_config(),
            access_log=False,  # the gateway logs each request itself, with its request id
        )
    finally:
        if made_here and metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_demo(args.host, args.port))
    return 0


def cmd_simulator(args: argparse.Namespace) -> int:
    account = SimAccount(args.access_key, args.secret_key, args.concurrency)
    print(f"Kling simulator on http://{args.host}:{args.port} (access key {args.access_key})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_simulator(SimulatorConfig((account,), delay=args.delay), args.host, args.port))
    return 0


def _with_directory(work: Callable[[TenantDirectory, Stores], Awaitable[int]]) -> int:
    settings = _settings()
    if settings.redis_url is None:
        print("error: set KGW_REDIS_URL (and KGW_KEY_PEPPER, KGW_MASTER_KEY): tenants live in the gateway's Redis",
              file=sys.stderr)  # fmt: skip
        return 2

    async def run() -> int:
        redis = open_redis(settings)  # through Sentinel too, when KGW_REDIS_SENTINELS is set
        assert redis is not None
        try:
            directory, stores = admin_directory(settings, redis)
            return await work(directory, stores)
        finally:
            await redis.aclose()

    try:
        return asyncio.run(run())
    except (ConfigurationError, GatewayError, SealingError, TenantsFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def argument_checked_by(check: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type` from one of the schemas' checks: its ValueError becomes argparse's usage error."""

    def checked(value: str) -> T:
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return checked


def cmd_tenants_create(args: argparse.Namespace) -> int:
    two_keys = (args.kling_access_key, args.kling_secret_key)
    if args.kling_api_key is not None and any(key is not None for key in two_keys):
        print("error: --kling-api-key is instead of --kling-access-key and --kling-secret-key", file=sys.stderr)
        return 2
    if args.kling_api_key is None and any(key is None for key in two_keys):
        print("error: give --kling-access-key and --kling-secret-key, or --kling-api-key", file=sys.stderr)
        return 2

    async def work(directory: TenantDirectory, stores: Stores) -> int:
        if args.kling_api_key is not None:
            credential = await directory.add_api_key_credential(args.kling_api_key, args.concurrency,
                                                                base_url=args.kling_base_url)  # fmt: skip
        else:
            credential = await directory.add_credential(args.kling_access_key, args.kling_secret_key,
                                                        args.concurrency, base_url=args.kling_base_url)  # fmt: skip
        policy = TenantPolicy(tuple(args.allowed_models) if args.allowed_models else None, args.default_model,
                              args.max_images)  # fmt: skip
        tenant = await directory.create_tenant(args.name, (credential.id,), policy)
        await stores.audit.append("cli", "tenant.create", tenant.id, {"name": tenant.name})
        print(f"created tenant {tenant.id} ({tenant.name}) on credential {credential.id}")
        return 0

    return _with_directory(work)


def cmd_tenants_list(_: argparse.Namespace) -> int:
    async def work(directory: TenantDirectory, _: Stores) -> int:
        for tenant in await directory.store.list_tenants():
            credentials = [await directory.store.get_credential(cid) for cid in tenant.credential_ids]
            kling = ",".join(f"{c.access_key}(concurrency={c.concurrency})" for c in credentials if c)
            print(f"{tenant.id}\t{tenant.name}\tkling={kling}")
        return 0

    return _with_directory(work)


def cmd_tenants_apply(args: argparse.Namespace) -> int:
    async def work(directory: TenantDirectory, stores: Stores) -> int:
        await apply_file(directory, stores.audit, args.file)
        print(f"applied {args.file}")
        return 0

    return _with_directory(work)


def cmd_keys_issue(args: argparse.Namespace) -> int:
    async def work(directory: TenantDirectory, stores: Stores) -> int:
        expires_at = time.time() + args.expires_in if args.expires_in else None
        issued = await directory.issue_key(args.tenant, args.label, expires_at)
        await stores.audit.append("cli", "key.issue", issued.record.key_id, {"tenant_id": args.tenant})
        print(f"key id: {issued.record.key_id}", file=sys.stderr)
        print("The key is shown only this once:", file=sys.stderr)
        print(issued.api_key)
        return 0

    return _with_directory(work)


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    async def work(directory: TenantDirectory, stores: Stores) -> int:
        issued = await directory.rotate_key(args.key_id, args.overlap)
        await stores.audit.append("cli", "key.rotate", args.key_id, {"key_id": issued.record.key_id})
        print(f"new key id: {issued.record.key_id}; {args.key_id} keeps working for {args.overlap} s", file=sys.stderr)
        print(issued.api_key)
        return 0

    return _with_directory(work)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    async def work(directory: TenantDirectory, stores: Stores) -> int:
        record = await directory.revoke_key(args.key_id)
        await stores.audit.append("cli", "key.revoke", record.key_id)
        print(f"revoked {record.key_id}")
        return 0

    return _with_directory(work)


def cmd_keys_list(args: argparse.Namespace) -> int:
    async def work(directory: TenantDirectory, _: Stores) -> int:
        records = await directory.store.list_keys(args.tenant)
        used = await directory.store.last_used([record.key_id for record in records])
        now = time.time()
        for record in records:
            state = "active" if record.usable_at(now) else ("revoked" if record.revoked_at else "expired")
            last = used.get(record.key_id)
            last_text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last)) if last else "never"
            print(f"{record.key_id}\t{state}\t{record.label}\tlast used {last_text}")
        return 0

    return _with_directory(work)


def cmd_master_key_new(_: argparse.Namespace) -> int:
    print(new_master_key())
    return 0


def cmd_master_key_rotate(_: argparse.Namespace) -> int:
    async def work(directory: TenantDirectory, stores: Stores) -> int:
        count = await directory.reseal_all()
        await stores.audit.append("cli", "master_key.rotate", "credentials", {"count": str(count)})
        print(f"re-sealed {count} Kling secret(s) under the first key of KGW_MASTER_KEY")
        return 0

    return _with_directory(work)


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.api_key:
        print("error: pass --api-key or set KGW_API_KEY", file=sys.stderr)
        return 2
    arguments = {"prompt": args.prompt, "num_images": args.num_images, "aspect_ratio": args.aspect_ratio}
    if args.model:
        arguments["model_name"] = args.model
    # The live display only on a terminal: piped or redirected, the output is just the paths.
    interactive = sys.stdout.isatty()
    return asyncio.run(
        generate_and_download(
            args.url, args.api_key, arguments, args.out, timeout_s=args.timeout, interactive=interactive
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kling-gateway", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    serve = verbs.add_parser("serve", help="run the gateway (configured by KGW_* settings)")
    serve.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a server's default is to listen
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(run=cmd_serve)

    demo = verbs.add_parser("demo", help="gateway + simulated Kling + a demo tenant; no Redis, no Kling account")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.set_defaults(run=cmd_demo)

    sim = verbs.add_parser("simulator", help="run the Kling simulator alone")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8001)
    sim.add_argument("--access-key", default="sim-access-key")
    sim.add_argument("--secret-key", default="sim-secret-key-change-me-0123456789abcdef")
    sim.add_argument("--delay", type=float, default=2.0, help="seconds from submit to finished")
    sim.add_argument("--concurrency", type=int, default=5, help="image slots of the simulated account")
    sim.set_defaults(run=cmd_simulator)

    tenants = verbs.add_parser("tenants", help="tenant administration").add_subparsers(dest="action", required=True)
    create = tenants.add_parser("create", help="create a tenant")
    create.add_argument("name")
    create.add_argument("--kling-access-key")
    create.add_argument("--kling-secret-key")
    create.add_argument(
        "--kling-api-key",
        type=argument_checked_by(check_static_api_key),
        help="instead of the two keys: a static API key made in Kling's console",
    )
    create.add_argument("--concurrency", type=int, default=5, help="images the Kling account may run at once")
    create.add_argument("--kling-base-url", type=argument_checked_by(check_kling_base_url),
                        help="the account's Kling API when not KGW_KLING_BASE_URL (a China account: "
                             "https://api-beijing.klingai.com)")  # fmt: skip
    create.set_defaults(run=cmd_tenants_create)
    create.add_argument("--allowed-models", nargs="+", help="image models this tenant may use (default: all)")
    create.add_argument("--default-model", help="model used when a request names none")
    create.add_argument("--max-images", type=int, default=9, help="largest num_images per request")
    tenants.add_parser("list", help="list tenants").set_defaults(run=cmd_tenants_list)
    apply = tenants.add_parser("apply", help="apply a tenants file (TOML) now, as serve does at start")
    apply.add_argument("file")
    apply.set_defaults(run=cmd_tenants_apply)

    keys = verbs.add_parser("keys", help="API key administration").add_subparsers(dest="action", required=True)
    issue = keys.add_parser("issue", help="issue a key (printed once)")
    issue.add_argument("tenant", help="tenant id")
    issue.add_argument("--label", default="")
    issue.add_argument("--expires-in", type=int, help="seconds until the key stops working")
    issue.set_defaults(run=cmd_keys_issue)
    rotate = keys.add_parser("rotate", help="issue a successor key; the old one expires after --overlap")
    rotate.add_argument("key_id")
    rotate.add_argument("--overlap", type=int, default=86_400, help="seconds the old key keeps working")
    rotate.set_defaults(run=cmd_keys_rotate)
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=cmd_keys_revoke)
    listing = keys.add_parser("list", help="list a tenant's keys (never the secrets)")
    listing.add_argument("tenant", help="tenant id")
    listing.set_defaults(run=cmd_keys_list)

    master = verbs.add_parser("master-key", help="the key that seals Kling secrets at rest").add_subparsers(
        dest="action", required=True
    )
    master.add_parser("new", help="print a new master key").set_defaults(run=cmd_master_key_new)
    master.add_parser(
        "rotate", help="re-seal every Kling secret under the first key of KGW_MASTER_KEY (list old keys after it)"
    ).set_defaults(run=cmd_master_key_rotate)

    generate = verbs.add_parser(
        "generate", help="generate images through a gateway, showing progress, then download them and print their paths"
    )
    generate.add_argument("prompt")
    generate.add_argument("--url", default=os.environ.get("KGW_URL", "http://127.0.0.1:8000"))
    generate.add_argument("--api-key", default=os.environ.get("KGW_API_KEY"))
    generate.add_argument("--out", default=".", help="directory for the images")
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument("--aspect-ratio", default="16:9")
    generate.add_argument("--model")
    generate.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    generate.set_defaults(run=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args.run
    return command(args)


if __name__ == "__main__":
    raise SystemExit(main())
