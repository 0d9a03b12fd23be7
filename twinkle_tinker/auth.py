"""API keys per tenant: `tml-` keys from a JSON keys file ({"tml-...": "tenant"}) or an environment
variable ("tenant=tml-...,tenant2=tml-..."). Used by twinkle_tinker.app on every request.
"""

from __future__ import annotations

import hmac
import json
import os
import pathlib

KEYS_ENV = "TWINKLE_TINKER_API_KEYS"
PREFIX = "tml-"


def load_keys(keys_file: str | os.PathLike[str] | None = None, env: str = KEYS_ENV) -> dict[str, str]:
    """Key -> tenant, from the file (if given) and the environment variable (if set); at least one key."""
    keys: dict[str, str] = {}
    if keys_file is not None:
        loaded = json.loads(pathlib.Path(keys_file).read_text())
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise ValueError(f"{keys_file}: expected a JSON object mapping API keys to tenant names")
        keys.update(loaded)
    for item in filter(None, (part.strip() for part in os.environ.get(env, "").split(","))):
        tenant, sep, key = item.partition("=")
        if not sep:
            raise ValueError(f"${env}: expected tenant=key pairs separated by commas, got {item!r}")
        keys[key.strip()] = tenant.strip()
    bad = [key[:8] + "..." for key in keys if not key.startswith(PREFIX) or len(key) < len(PREFIX) + 8]
    if bad:
        raise ValueError(f"API keys must start with {PREFIX!r} and have at least 8 more characters: {bad}")
    if not keys:
        raise ValueError(f"no API keys: give --keys-file or set ${env}")
    return keys


class KeyRing:
    """Looks a presented key up in constant time per key."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = [(key.encode(), tenant) for key, tenant in keys.items()]

    def tenant(self, presented: str | None) -> str | None:
        if not presented:
            return None
        found = None
        for key, tenant in self._keys:
            if hmac.compare_digest(key, presented.encode()):
                found = tenant
        return found
