"""Bundle signing keys: ed25519, PEM on disk, the private half readable by its owner only.

The private key is written unencrypted (PKCS#8) because the signing step runs
unattended (a retraining timer); its protection is the file mode, which we set
at creation (``O_EXCL``, 0600, never a chmod after the fact) and check again on
every load, the way ssh refuses a world-readable identity.
"""
from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.bundle import key_id_of, load_trusted_keys, public_key_pem

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_NAME = "bundle-signing"


class KeyFileError(ValueError):
    """A key file is missing, malformed, unsafe, or would be overwritten."""


@dataclass(frozen=True)
class SigningKey:
    private_key: Any          # cryptography Ed25519PrivateKey
    key_id: str
    path: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate(out_dir: str | Path, name: str = DEFAULT_NAME) -> tuple[Path, Path, str]:
    """Write NAME.key (0600) and NAME.pub; refuse to overwrite either. Returns (key, pub, key id)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    if not _NAME_RE.match(name):
        raise KeyFileError(f"key name {name!r} must match [A-Za-z0-9._-] (max 64)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (key_path, pub_path):
        if os.path.lexists(p):
            raise KeyFileError(f"{p} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    raw_pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    try:
        _write_new(key_path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), 0o600)
        _write_new(pub_path, public_key_pem(raw_pub), 0o644)
    except FileExistsError as exc:  # lost a race with another keygen
        raise KeyFileError(f"{exc.filename} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write key files in {out}: {exc.strerror}") from None
    os.chmod(key_path, 0o600)  # umask may have narrowed it further; never wider
    return key_path, pub_path, key_id_of(raw_pub)


def load_signing_key(path: str | Path) -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    p = Path(path)
    try:
        st = os.stat(p)
        data = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read private key {p}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"private key {p} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                           f"run: chmod 600 {p}")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{p} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} is not an ed25519 private key")
    raw_pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return SigningKey(key, key_id_of(raw_pub), p)


def load_public_keys(paths: list[str] | list[Path]) -> dict:
    """{key_id: TrustedKey}; KeyFileError names the file that is wrong."""
    try:
        return load_trusted_keys(paths)
    except ValueError as exc:
        raise KeyFileError(str(exc)) from None
