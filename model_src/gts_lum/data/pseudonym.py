"""User pseudonyms: a keyed HMAC of the operator's user id, so that stored artefacts hold no raw id.

`pseudonymize(user_id)` is the hex HMAC-SHA256 of the id under the key in the environment variable
GTS_LUM_PSEUDONYM_KEY (never in a file); without the key a pseudonym cannot be linked back. The Feast
feature store keys users by it, and a serving export names its profile rows by it (`profiles_by_pseudonym`).

`key_check()` is the HMAC of a fixed text under the key: stored beside pseudonyms, it tells whether the
key at hand is the one they were made with, without revealing the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gts_lum.data.events import EventLog

PSEUDONYM_KEY_ENV = "GTS_LUM_PSEUDONYM_KEY"
MIN_KEY_BYTES = 32  # an HMAC-SHA256 key as strong as its output; a short key can be searched for
KEY_CHECK = "pseudonym_key_check"  # the array of a profile table (users.npz) whose ids are pseudonyms
_KEY_CHECK_TEXT = b"gts-lum pseudonym key check"


def pseudonym_key() -> bytes:
    """The key from the environment; ValueError when it is missing or too short to be safe."""
    key = os.environ.get(PSEUDONYM_KEY_ENV, "")
    if not key:
        raise ValueError(
            f"{PSEUDONYM_KEY_ENV} is not set: users are keyed by an HMAC pseudonym whose key comes "
            f"only from the environment (e.g. a Kubernetes Secret); set it to a random string of at least {MIN_KEY_BYTES} bytes "
            "(e.g. `openssl rand -hex 32`)"
        )
    if len(key.encode()) < MIN_KEY_BYTES:
        raise ValueError(
            f"{PSEUDONYM_KEY_ENV} holds {len(key.encode())} bytes: a pseudonym key needs at least {MIN_KEY_BYTES} "
            "(e.g. `openssl rand -hex 32`); a short key lets anyone holding the stores recover user ids by trying keys"
        )
    return key.encode()


def pseudonymize(user_id: str) -> str:
    """The pseudonym of a user (the Feast entity key): hex HMAC-SHA256 of the id under GTS_LUM_PSEUDONYM_KEY."""
    return hmac.new(pseudonym_key(), str(user_id).encode(), hashlib.sha256).hexdigest()


def pseudonymize_all(user_ids: Sequence) -> np.ndarray:
    key = pseudonym_key()
    return np.array([hmac.new(key, str(u).encode(), hashlib.sha256).hexdigest() for u in user_ids], dtype=object)


def key_check() -> str:
    return hmac.new(pseudonym_key(), _KEY_CHECK_TEXT, hashlib.sha256).hexdigest()


def profiles_by_pseudonym(users_file: str | Path) -> bool:
    """Whether a saved profile table (a model's assets/users.npz) names users by pseudonym (a serving export)
    rather than by raw id (a training folder). ValueError when it does and the key is missing or is not the
    one its pseudonyms were made with: no user would find their profile row. False without a table."""
    if not Path(users_file).exists():
        return False
    with np.load(users_file, allow_pickle=False) as z:
        stored = str(z[KEY_CHECK]) if KEY_CHECK in z.files else None
    if stored is not None and key_check() != stored:
        raise ValueError(
            f"{users_file}: its users are pseudonyms made with another {PSEUDONYM_KEY_ENV}; with this key no user "
            "would find their profile row: set the key the export was written with"
        )
    return stored is not None


def pseudonymous_log(log_: EventLog) -> EventLog:
    """`log_` with its users named by pseudonym, as a pseudonymous profile table knows them."""
    return dataclasses.replace(log_, user_ids=pseudonymize_all(log_.user_ids))
