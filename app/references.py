"""ReferenceGuard: the checks on a reference-image or webhook URL that need I/O or settings.

`GenerateRequest` already refused what the text alone tells (local paths, other schemes, credentials, IP
literals, internal names). Here, before anything is counted or sent: `http` only when the operator allows
it, and no host that resolves to a private, loopback, link-local, multicast or metadata address. The
gateway never fetches the image (Kling does), so a name that does not resolve here is let through: Kling
answers for what it cannot fetch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from app.errors import InvalidRequest

Resolver = Callable[[str], Awaitable[list[str]]]
RESOLVE_TIMEOUT_S = 2.0


async def system_resolver(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


# Ranges that no public host uses, which `is_global` of Python 3.11 before 3.11.10 (CVE-2024-4032) calls global:
# local-use NAT64, which a cluster's own translator maps onto private IPv4 (RFC 8215), and the deprecated
# IPv4-compatible addresses (RFC 4291 §2.5.5.1), `::a9fe:a9fe` for the metadata service.
_NEVER_PUBLIC = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("::/96"))


def is_public_address(text: str) -> bool:
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NEVER_PUBLIC):
            return False
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return is_public_address(str(embedded))
        if address in ipaddress.ip_network("64:ff9b::/96"):  # NAT64: the IPv4 address rides in the low bits
            return is_public_address(str(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)))
    return address.is_global and not address.is_multicast


class ReferenceGuard:
    def __init__(
        self,
        *,
        allow_http: bool = False,
        resolver: Resolver = system_resolver,
        webhook_hosts: frozenset[str] = frozenset(),
    ) -> None:
        self._allow_http = allow_http
        self._resolver = resolver
        # Receivers the operator vouches for (in-cluster services): private addresses and http allowed.
        self._webhook_hosts = frozenset(host.lower() for host in webhook_hosts)

    async def check_webhook(self, url: str) -> str | None:
        """Raises InvalidRequest naming `webhook_url` when the gateway must not post results there. Unlike a
        reference image, the gateway itself sends to this URL, so a name that does not resolve is refused.

        Returns the checked address to connect to (None for a host the operator allows as it is): connecting
        to it, rather than resolving the name again, is what keeps a name from switching to a private address
        between the check and the connection (DNS rebinding)."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if host in self._webhook_hosts:
            return None
        if parts.scheme != "https":
            raise InvalidRequest("webhook_url", "must be an https:// URL")
        if parts.port not in (None, 443):
            # Other ports would let a caller probe services behind the gateway, even blind.
            raise InvalidRequest("webhook_url", "must use the default https port (443)")
        addresses = await self._resolved(host)
        if addresses is None:
            raise InvalidRequest("webhook_url", f"host {host!r} does not resolve")
        if not addresses or not all(is_public_address(address) for address in addresses):
            raise InvalidRequest("webhook_url", f"host {host!r} resolves to a non-public address")
        return addresses[0]

    async def check(self, reference: str | None) -> None:
        """Raises InvalidRequest naming `ref_image_url` when the URL must not be handed to Kling."""
        if reference is None or "://" not in reference:
            return  # no reference, or inline image data
        parts = urlsplit(reference)
        if parts.scheme == "http" and not self._allow_http:
            raise InvalidRequest("ref_image_url", "must be an https:// URL (this gateway does not allow http)")
        host = parts.hostname or ""
        addresses = await self._resolved(host)
        if addresses is None:
            return  # Kling cannot fetch it either; it says so itself
        if not all(is_public_address(address) for address in addresses):
            raise InvalidRequest("ref_image_url", f"host {host!r} resolves to a non-public address")

    async def _resolved(self, host: str) -> list[str] | None:
        """The host's addresses, or None when it does not resolve (within RESOLVE_TIMEOUT_S)."""
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                return await self._resolver(host)
        except (OSError, TimeoutError, UnicodeError):
            return None
