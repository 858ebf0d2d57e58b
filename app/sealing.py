"""Kling secret keys sealed at rest under `KGW_MASTER_KEY` (Fernet: AES-128-CBC + HMAC-SHA256).

`KGW_MASTER_KEY` holds one or more Fernet keys, comma-separated: the first seals, every one opens, so a
new key can be put in front and the old ones kept until `kling-gateway master-key rotate` has re-sealed
everything. Fernet has no associated data, so the sealed payload carries the id of the credential it
belongs to and opening checks it: a blob copied onto another credential does not open.
"""

from __future__ import annotations

import json

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SealingError(Exception):
    """A sealed secret cannot be opened with the configured master keys (or belongs elsewhere)."""


def new_master_key() -> str:
    """32 random bytes, url-safe base64: one valid `KGW_MASTER_KEY` entry."""
    return Fernet.generate_key().decode()


def parse_master_keys(value: str) -> list[bytes]:
    """The comma-separated keys of `KGW_MASTER_KEY`; raises ValueError naming the bad entry's position."""
    keys = [part.strip().encode() for part in value.split(",") if part.strip()]
    if not keys:
        raise ValueError("KGW_MASTER_KEY is empty")
    for position, key in enumerate(keys, start=1):
        try:
            Fernet(key)
        except ValueError as exc:
            raise ValueError(
                f"KGW_MASTER_KEY entry {position} is not a Fernet key (32 bytes, url-safe base64)"
            ) from exc
    return keys


class SecretSealer:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one master key is required")
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    @classmethod
    def ephemeral(cls) -> SecretSealer:
        """For the memory store: secrets live only as long as the process, and so may the key."""
        return cls([Fernet.generate_key()])

    def seal(self, owner_id: str, secret: str) -> str:
        return self._fernet.encrypt(json.dumps({"owner": owner_id, "secret": secret}).encode()).decode()

    def open(self, owner_id: str, sealed: str) -> str:
        try:
            payload = json.loads(self._fernet.decrypt(sealed.encode()))
        except (InvalidToken, ValueError) as exc:
            raise SealingError(f"the secret of {owner_id} cannot be opened with the configured master keys") from exc
        if payload.get("owner") != owner_id:
            raise SealingError(f"the sealed secret stored for {owner_id} belongs to another record")
        secret: str = payload["secret"]
        return secret

    def reseal(self, owner_id: str, sealed: str) -> str:
        """The same secret sealed under the current (first) master key."""
        return self.seal(owner_id, self.open(owner_id, sealed))
