"""Signed model bundles: one file that a device can check before anything in it is used.

Format: an uncompressed POSIX tar holding, as regular files only,

    manifest.json          canonical JSON (sorted keys, no spaces), the signed bytes
    manifest.sig           64 raw bytes: ed25519 signature over manifest.json exactly
    <kind>/<file>          the artefacts, one flat directory per model kind

Why an uncompressed tar: the artefacts are already dense (``.npz`` is written
with savez_compressed, ``.tflite`` is packed floats), so gzip would save little
and would add a decompression bomb to guard against on the device; with a plain
tar every size the device checks is the size it will hold in memory and on disk.
Why tar at all: it is a single file the standard library reads everywhere. We
never let ``tarfile`` extract: members are read into memory, checked against the
signed manifest and written by the installer with ``O_EXCL | O_NOFOLLOW``.

Manifest (``FORMAT_VERSION`` 1)::

    {"format_version": 1, "kinds": ["forest"], "version": 7,
     "target": {"type": "device"|"group"|"fleet", "id": "<id>" ("all" for fleet)},
     "feature_names": [...], "interval_s": 1.0,
     "created_at": "2024-05-01T12:00:00Z", "expires_at": "..." (optional),
     "key_id": "<32 hex: sha256 of the raw public key, first 16 bytes>",
     "artefacts": [{"path": "forest/forest.npz", "kind": "forest",
                    "sha256": "<64 hex>", "size_bytes": 1234}, ...]}

Nothing in a bundle can run code: pickle/joblib files are refused by name,
``.npz``/``.npy`` are opened with ``allow_pickle=False`` and refused if any
array has an object dtype, JSON must parse, ``.tflite`` must carry its magic,
and any other file type is refused unless ``BundleLimits.allowed_suffixes``
says otherwise.

This module imports only numpy; ``cryptography`` is imported inside the
functions that sign or verify, so the daemon pays for it only when a bundle
arrives. Public keys are parsed here without it (an ed25519 SubjectPublicKeyInfo
is a fixed 12-byte DER prefix plus the 32-byte key).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
TARGET_TYPES = ("device", "group", "fleet")
# Models the device trained itself are installed like bundles under this target type; it is never
# valid in a manifest that arrives from outside (only ``allow_local=True`` readers of the device's
# own files accept it).
LOCAL_TARGET = "local"
FLEET_ID = "all"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".dill", ".pt", ".pth", ".sav")
SIGNATURE_BYTES = 64
# The installer keeps the signed manifest beside a kind's artefacts under these names.
INSTALLED_MANIFEST = "bundle.manifest.json"
INSTALLED_SIGNATURE = "bundle.manifest.sig"

_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")   # one path component
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TFLITE_MAGIC = b"TFL3"


class BundleError(ValueError):
    """The bundle is refused; ``str(exc)`` is the one-line reason sent back to the fleet."""

    def __init__(self, reason: str, stage: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


@dataclass(frozen=True)
class BundleLimits:
    """Upper bounds checked before the bytes are trusted; all configurable."""

    max_bundle_bytes: int = 16 * 1024 * 1024
    max_file_bytes: int = 16 * 1024 * 1024
    max_members: int = 64
    max_manifest_bytes: int = 256 * 1024
    max_unpacked_bytes: int = 64 * 1024 * 1024   # inside an .npz (a zip): decompressed total
    allowed_suffixes: tuple[str, ...] = (".json", ".npz", ".npy", ".tflite")


@dataclass(frozen=True)
class Target:
    type: str
    id: str

    def as_dict(self) -> dict[str, str]:
        return {"type": self.type, "id": self.id}

    @property
    def label(self) -> str:
        return "fleet" if self.type == "fleet" else f"{self.type}:{self.id}"

    @property
    def is_local(self) -> bool:
        return self.type == LOCAL_TARGET

    @property
    def slug(self) -> str:
        """Safe as a directory-name suffix (ids are restricted to [A-Za-z0-9._:-])."""
        return "fleet" if self.type == "fleet" else f"{self.type}-{self.id.replace(':', '_')}"


def parse_target(text: str) -> Target:
    """'device:ID', 'group:G' or 'fleet' (the CLI form)."""
    if text == "fleet":
        return Target("fleet", FLEET_ID)
    kind, sep, ident = text.partition(":")
    if not sep or kind not in ("device", "group"):
        raise ValueError(f"target must be device:ID, group:NAME or fleet, got {text!r}")
    return check_target({"type": kind, "id": ident})


def check_target(raw: Any, allow_local: bool = False) -> Target:
    """``allow_local``: also accept the device's own target type (pointers, installed manifests)."""
    if not isinstance(raw, dict) or set(raw) != {"type", "id"}:
        raise ValueError("target must be an object with exactly 'type' and 'id'")
    t, ident = raw["type"], raw["id"]
    types = TARGET_TYPES + ((LOCAL_TARGET,) if allow_local else ())
    if t not in types:
        raise ValueError(f"target type must be one of {', '.join(types)}, got {t!r}")
    if not isinstance(ident, str) or not _ID_RE.match(ident):
        raise ValueError(f"target id {ident!r} is not a valid id ([A-Za-z0-9._:-], max 128)")
    if t == "fleet" and ident != FLEET_ID:
        raise ValueError(f"fleet target id must be {FLEET_ID!r}")
    if t == "group" and ident == FLEET_ID:
        raise ValueError(f"group name {FLEET_ID!r} is reserved for the fleet")
    return Target(t, ident)


@dataclass(frozen=True)
class Artefact:
    path: str          # "<kind>/<name>"
    kind: str
    sha256: str
    size_bytes: int

    @property
    def name(self) -> str:
        return self.path.split("/", 1)[1]


@dataclass(frozen=True)
class Manifest:
    format_version: int
    kinds: tuple[str, ...]
    version: int
    target: Target
    feature_names: tuple[str, ...]
    interval_s: float
    created_at: str
    expires_at: str | None
    key_id: str
    artefacts: tuple[Artefact, ...]
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format_version": self.format_version,
            "kinds": list(self.kinds),
            "version": self.version,
            "target": self.target.as_dict(),
            "feature_names": list(self.feature_names),
            "interval_s": self.interval_s,
            "created_at": self.created_at,
            "key_id": self.key_id,
            "artefacts": [{"path": a.path, "kind": a.kind, "sha256": a.sha256, "size_bytes": a.size_bytes}
                          for a in self.artefacts],
        }
        if self.expires_at is not None:
            doc["expires_at"] = self.expires_at
        return doc

    def artefacts_of(self, kind: str) -> tuple[Artefact, ...]:
        return tuple(a for a in self.artefacts if a.kind == kind)

    @property
    def expires_at_s(self) -> float | None:
        return None if self.expires_at is None else parse_iso_s(self.expires_at)


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, hashes and contents passed; ``files`` maps path -> bytes."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    files: Mapping[str, bytes]
    bundle_sha256: str

    @property
    def manifest_sha256(self) -> str:
        return sha256_hex(self.manifest_bytes)


# -- small pure helpers ------------------------------------------------------------
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iso_utc(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso_s(text: str) -> float:
    """ISO 8601 with an explicit zone -> epoch seconds (a zoneless time is ambiguous: refused)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return dt.timestamp()


def canonical_json(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def key_id_of(raw_public_key: bytes) -> str:
    """Fingerprint of a raw 32-byte ed25519 public key (what the manifest names)."""
    if len(raw_public_key) != 32:
        raise ValueError("an ed25519 public key is 32 bytes")
    return hashlib.sha256(raw_public_key).hexdigest()[:32]


def parse_public_key_pem(text: str) -> bytes:
    """PEM 'PUBLIC KEY' (SubjectPublicKeyInfo) of an ed25519 key -> the raw 32 bytes."""
    m = re.search(r"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", text, re.S)
    if not m:
        raise ValueError("not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')")
    try:
        der = base64.b64decode("".join(m.group(1).split()), validate=True)
    except ValueError:
        raise ValueError("PEM public key is not valid base64") from None
    if len(der) != len(_ED25519_SPKI_PREFIX) + 32 or not der.startswith(_ED25519_SPKI_PREFIX):
        raise ValueError("public key is not an ed25519 key")
    return der[len(_ED25519_SPKI_PREFIX):]


def public_key_pem(raw_public_key: bytes) -> bytes:
    der = _ED25519_SPKI_PREFIX + raw_public_key
    body = base64.b64encode(der).decode("ascii")
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n".encode("ascii")


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    raw: bytes
    source: str


def load_trusted_keys(paths: Sequence[str | Path]) -> dict[str, TrustedKey]:
    """Public key files -> {key_id: key}; a missing or malformed file is an error (config time)."""
    keys: dict[str, TrustedKey] = {}
    for p in paths:
        path = Path(p)
        try:
            raw = parse_public_key_pem(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"trusted key {path}: {exc}") from None
        kid = key_id_of(raw)
        keys[kid] = TrustedKey(kid, raw, str(path))
    return keys


def check_member_name(name: str) -> None:
    """A bundle path: relative, no '..', no empty or dot components, a small charset."""
    if not name or "\x00" in name or "\\" in name:
        raise BundleError(f"unsafe member path {name!r}", "parse")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BundleError(f"absolute member path {name!r} not allowed", "parse")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"unsafe member path {name!r} ('..', '.' or empty component)", "parse")
    if not all(_NAME_RE.match(p) for p in parts):
        raise BundleError(f"unsafe member path {name!r} (allowed: [A-Za-z0-9._-])", "parse")


def check_artefact_name(path: str, limits: BundleLimits) -> None:
    check_member_name(path)
    parts = path.split("/")
    if len(parts) != 2 or not _KIND_RE.match(parts[0]):
        raise BundleError(f"artefact {path!r} must be '<kind>/<file>'", "parse")
    lower = parts[1].lower()
    if lower.startswith("bundle.manifest"):
        raise BundleError(f"artefact name {path!r} is reserved", "parse")
    if lower.endswith(PICKLE_SUFFIXES):
        raise BundleError(f"pickle/joblib file not allowed: {path!r}", "parse")
    if not lower.endswith(tuple(s.lower() for s in limits.allowed_suffixes)):
        raise BundleError(f"file type not allowed: {path!r} (allowed: {', '.join(limits.allowed_suffixes)})",
                          "parse")


# -- manifest schema ----------------------------------------------------------------
def manifest_from_dict(doc: Any, limits: BundleLimits = BundleLimits(), allow_local: bool = False) -> Manifest:
    """Schema check of a parsed manifest; every problem is a BundleError naming the field.

    ``allow_local``: the manifest the device wrote for a model it trained itself (target
    type "local", empty key id, no signature); never for bytes received from outside.
    """
    def bad(msg: str) -> BundleError:
        return BundleError(f"bad manifest: {msg}", "parse")

    if not isinstance(doc, dict):
        raise bad("not an object")
    required = {"format_version", "kinds", "version", "target", "feature_names", "interval_s",
                "created_at", "key_id", "artefacts"}
    missing = sorted(required - set(doc))
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    unknown = sorted(set(doc) - required - {"expires_at"})
    if unknown:
        raise bad(f"unknown fields {', '.join(unknown)}")
    fv = doc["format_version"]
    if type(fv) is not int or fv != FORMAT_VERSION:
        raise bad(f"format_version {fv!r} is not supported (this agent reads {FORMAT_VERSION})")
    version = doc["version"]
    if type(version) is not int or version < 1 or version > 2**53:
        raise bad(f"version must be a positive integer, got {version!r}")
    kinds = doc["kinds"]
    if (not isinstance(kinds, list) or not kinds or len(set(kinds)) != len(kinds)
            or not all(isinstance(k, str) and _KIND_RE.match(k) for k in kinds)):
        raise bad(f"kinds must be a non-empty list of distinct kind names, got {kinds!r}")
    try:
        target = check_target(doc["target"], allow_local)
    except ValueError as exc:
        raise bad(str(exc)) from None
    names = doc["feature_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise bad("feature_names must be a list of strings")
    interval = doc["interval_s"]
    if type(interval) not in (int, float) or not math.isfinite(interval) or interval <= 0:
        raise bad(f"interval_s must be a positive number, got {interval!r}")
    for key in ("created_at", "expires_at"):
        if key in doc:
            try:
                parse_iso_s(doc[key])
            except (TypeError, ValueError, AttributeError):
                raise bad(f"{key} must be an ISO 8601 time with a zone, got {doc[key]!r}") from None
    key_id = doc["key_id"]
    if target.is_local:
        if key_id != "":
            raise bad("a local model's key_id must be empty (it is not signed)")
    elif not isinstance(key_id, str) or not re.match(r"^[0-9a-f]{32}$", key_id):
        raise bad("key_id must be 32 hex digits")
    raw_arts = doc["artefacts"]
    if not isinstance(raw_arts, list) or not raw_arts:
        raise bad("artefacts must be a non-empty list")
    if len(raw_arts) + 2 > limits.max_members:
        raise BundleError(f"too many artefacts ({len(raw_arts)}; limit {limits.max_members - 2})", "parse")
    arts: list[Artefact] = []
    seen: set[str] = set()
    for a in raw_arts:
        if not isinstance(a, dict) or set(a) != {"path", "kind", "sha256", "size_bytes"}:
            raise bad("each artefact needs exactly path, kind, sha256, size_bytes")
        path = a["path"]
        if not isinstance(path, str):
            raise bad("artefact path must be a string")
        check_artefact_name(path, limits)
        if path in seen or path in (MANIFEST_NAME, SIGNATURE_NAME):
            raise bad(f"duplicate artefact {path!r}")
        seen.add(path)
        if a["kind"] != path.split("/", 1)[0] or a["kind"] not in kinds:
            raise bad(f"artefact {path!r} has kind {a['kind']!r} not matching its directory or kinds")
        if not isinstance(a["sha256"], str) or not _HEX64.match(a["sha256"]):
            raise bad(f"artefact {path!r} sha256 must be 64 lowercase hex digits")
        size = a["size_bytes"]
        if type(size) is not int or size < 0:
            raise bad(f"artefact {path!r} size_bytes must be a non-negative integer")
        if size > limits.max_file_bytes:
            raise BundleError(f"artefact {path!r} is too large ({size} bytes > {limits.max_file_bytes})", "size")
        arts.append(Artefact(path, a["kind"], a["sha256"], size))
    empty = [k for k in kinds if not any(a.kind == k for a in arts)]
    if empty:
        raise bad(f"kinds {empty} have no artefacts")
    return Manifest(
        format_version=fv, kinds=tuple(kinds), version=version, target=target,
        feature_names=tuple(names), interval_s=float(interval), created_at=doc["created_at"],
        expires_at=doc.get("expires_at"), key_id=key_id, artefacts=tuple(arts), raw=doc,
    )


# -- content safety ------------------------------------------------------------------
def _npy_nbytes(path: str, member: str, fp: Any, declared_bytes: int, budget: int) -> int:
    """Read only the .npy header: refuse object dtypes and sizes over budget before numpy allocates.

    numpy allocates ``prod(shape) * itemsize`` from the header before reading the
    data, so a tiny file could otherwise ask for terabytes.
    """
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise BundleError(f"{path!r} {member}: unsupported .npy version {version}", "content")
    except BundleError:
        raise
    except (ValueError, EOFError, OSError) as exc:
        raise BundleError(f"{path!r} {member}: not a valid .npy ({exc})", "content") from None
    if dtype.hasobject:
        raise BundleError(f"{path!r} contains object arrays (pickle) in {member}", "content")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > budget:
        raise BundleError(f"{path!r} {member} unpacks to {nbytes} bytes (> {budget})", "content")
    if declared_bytes >= 0 and nbytes > declared_bytes:
        raise BundleError(f"{path!r} {member}: header claims {nbytes} bytes, file holds {declared_bytes}", "content")
    return nbytes


def check_npz_bytes(path: str, data: bytes, limits: BundleLimits) -> None:
    """An .npz must be a zip of .npy plain arrays: no object dtype, bounded once unpacked."""
    budget = limits.max_unpacked_bytes
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if total > budget:
                raise BundleError(f"{path!r} unpacks to {total} bytes (> {budget})", "content")
            for i in infos:
                if "/" in i.filename or not i.filename.endswith(".npy"):
                    raise BundleError(f"{path!r} holds a non-array member {i.filename!r}", "content")
                with zf.open(i) as fp:
                    budget -= _npy_nbytes(path, i.filename, fp, i.file_size, budget)
    except zipfile.BadZipFile:
        raise BundleError(f"{path!r} is not a valid .npz", "content") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for key in z.files:
                if z[key].dtype.hasobject:   # z[key] itself raises ValueError for a pickled array
                    raise BundleError(f"{path!r} contains object arrays (pickle) in {key!r}", "content")
    except BundleError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise BundleError(f"{path!r} contains object arrays (pickle)", "content") from None
        raise BundleError(f"{path!r} is not a valid .npz: {exc}", "content") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path!r} is not a valid .npz: {exc}", "content") from None


def check_npy_bytes(path: str, data: bytes, limits: BundleLimits) -> None:
    _npy_nbytes(path, "array", io.BytesIO(data), len(data), limits.max_unpacked_bytes)
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise BundleError(f"{path!r} contains object arrays (pickle) or is invalid: {exc}", "content") from None
    except (OSError, EOFError) as exc:
        raise BundleError(f"{path!r} is not a valid .npy: {exc}", "content") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise BundleError(f"{path!r} contains object arrays (pickle)", "content")


def check_content(path: str, data: bytes, limits: BundleLimits) -> None:
    """Defence in depth: even a validly signed file must be inert data of its declared type."""
    lower = path.lower()
    if data[:1] == b"\x80" and len(data) > 1 and data[1] <= 5 and not lower.endswith(".tflite"):
        raise BundleError(f"{path!r} looks like a pickle stream", "content")
    if lower.endswith(".npz"):
        check_npz_bytes(path, data, limits)
    elif lower.endswith(".npy"):
        check_npy_bytes(path, data, limits)
    elif lower.endswith(".json"):
        try:
            json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BundleError(f"{path!r} is not valid JSON", "content") from None
    elif lower.endswith(".tflite"):
        if data[4:8] != _TFLITE_MAGIC:
            raise BundleError(f"{path!r} is not a TFLite flatbuffer (no TFL3 identifier)", "content")


# -- reading --------------------------------------------------------------------------
def read_members(data: bytes, limits: BundleLimits = BundleLimits()) -> dict[str, bytes]:
    """Tar bytes -> {name: bytes}, refusing anything but small regular files with safe names."""
    if len(data) > limits.max_bundle_bytes:
        raise BundleError(f"bundle too large ({len(data)} bytes > limit {limits.max_bundle_bytes})", "size")
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:   # "r:" = uncompressed only
            count = 0
            while True:
                info = tf.next()
                if info is None:
                    break
                count += 1
                if count > limits.max_members:
                    raise BundleError(f"too many members (> {limits.max_members})", "parse")
                name = info.name
                check_member_name(name)
                if info.issym() or info.islnk():
                    raise BundleError(f"link member {name!r} not allowed (symlink/hardlink)", "parse")
                if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):   # also refuses GNU sparse files
                    raise BundleError(f"member {name!r} is not a regular file (dirs/devices/fifos refused)",
                                      "parse")
                if info.size > limits.max_file_bytes:
                    raise BundleError(f"member {name!r} is too large ({info.size} bytes > {limits.max_file_bytes})",
                                      "size")
                if name in members:
                    raise BundleError(f"duplicate member {name!r}", "parse")
                f = tf.extractfile(info)
                if f is None:  # pragma: no cover - isreg() members always have a file object
                    raise BundleError(f"member {name!r} has no data", "parse")
                members[name] = f.read(info.size)
    except BundleError:
        raise
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"not a valid bundle (uncompressed tar expected): {exc}", "parse") from None
    if not members:
        raise BundleError("not a valid bundle: empty archive", "parse")
    return members


def parse_bundle(data: bytes, limits: BundleLimits = BundleLimits()) -> tuple[Manifest, bytes, bytes, dict[str, bytes]]:
    """Structure only (no crypto): (manifest, manifest bytes, signature, artefact files)."""
    members = read_members(data, limits)
    manifest_bytes = members.pop(MANIFEST_NAME, None)
    signature = members.pop(SIGNATURE_NAME, None)
    if manifest_bytes is None:
        raise BundleError(f"not a valid bundle: no {MANIFEST_NAME}", "parse")
    if signature is None:
        raise BundleError(f"unsigned bundle: no {SIGNATURE_NAME}", "parse")
    if len(manifest_bytes) > limits.max_manifest_bytes:
        raise BundleError(f"manifest too large ({len(manifest_bytes)} bytes)", "size")
    if len(signature) != SIGNATURE_BYTES:
        raise BundleError(f"bad signature: {SIGNATURE_NAME} must be {SIGNATURE_BYTES} bytes", "signature")
    for name in members:          # names first: a pickle member is refused as such, listed or not
        if name.split("/")[-1].lower().endswith(PICKLE_SUFFIXES):
            raise BundleError(f"pickle/joblib file not allowed: {name!r}", "parse")
    try:
        doc = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleError("bad manifest: not valid JSON", "parse") from None
    manifest = manifest_from_dict(doc, limits)
    listed = {a.path for a in manifest.artefacts}
    extra = sorted(set(members) - listed)
    if extra:
        raise BundleError(f"member {extra[0]!r} is not listed in the manifest", "parse")
    absent = sorted(listed - set(members))
    if absent:
        raise BundleError(f"artefact {absent[0]!r} is listed in the manifest but missing", "parse")
    return manifest, manifest_bytes, signature, members


def verify_signature(manifest_bytes: bytes, signature: bytes, raw_public_key: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw_public_key).verify(signature, manifest_bytes)
    except InvalidSignature:
        return False
    return True


def verify_bundle(data: bytes, trusted: Mapping[str, TrustedKey], limits: BundleLimits = BundleLimits(),
                  now_s: float | None = None) -> VerifiedBundle:
    """Size, structure, signature by a trusted key, artefact hashes, inert content, then expiry
    (when ``now_s`` is given). Raises BundleError with the first failing reason.
    """
    manifest, manifest_bytes, signature, files = parse_bundle(data, limits)
    key = trusted.get(manifest.key_id)
    if key is None:
        raise BundleError(f"unknown key {manifest.key_id}", "signature")
    if not verify_signature(manifest_bytes, signature, key.raw):
        raise BundleError(f"bad signature (key {manifest.key_id})", "signature")
    for a in manifest.artefacts:
        blob = files[a.path]
        if len(blob) != a.size_bytes:
            raise BundleError(f"artefact {a.path!r} size {len(blob)} != manifest {a.size_bytes}", "hash")
        if sha256_hex(blob) != a.sha256:
            raise BundleError(f"artefact {a.path!r} sha256 mismatch (tampered)", "hash")
    for a in manifest.artefacts:
        check_content(a.path, files[a.path], limits)
    if now_s is not None:
        check_not_expired(manifest, now_s)
    return VerifiedBundle(manifest, manifest_bytes, signature, files, sha256_hex(data))


def check_not_expired(manifest: Manifest, now_s: float) -> None:
    exp = manifest.expires_at_s
    if exp is not None and now_s >= exp:
        raise BundleError(f"expired at {manifest.expires_at}", "expiry")


def feature_bases(names: Sequence[str]) -> list[str]:
    """Metrics a model needs sampled: '<metric>|mean10' needs '<metric>'; 'time:*' and 'events:*'
    (from the clock and the device's own event log) need none."""
    out: list[str] = []
    for n in names:
        base = n.split("|", 1)[0]
        if base.startswith(("time:", "events:")) or base in out:
            continue
        out.append(base)
    return out


# Kinds that score without a feature the device lacks: the forest puts the training median in
# its place (model.json "baseline"), the maintenance trees route it as missing (NaN) like
# scikit-learn, and a cluster distance uses the features both sides have. An LSTM cannot
# forecast from an input it never gets, so a bundle holding one still needs every feature.
MISSING_TOLERANT_KINDS = ("forest", "maintenance", "cluster")


def missing_features(kinds: Sequence[str], feature_names: Sequence[str], available: Collection[str],
                     forest_meta: Mapping[str, Any] | None = None) -> list[str]:
    """The features a bundle's model will do without on this device; BundleError when it cannot.

    A bundle is refused when the device samples none of its features (the model would score a
    constant), when it holds a kind that needs them all, or when its forest has no training
    medians to stand in for the missing ones.
    """
    bases = feature_bases(feature_names)
    missing = [b for b in bases if b not in available]
    if not missing:
        return []
    listed = ", ".join(missing)
    strict = [k for k in kinds if k not in MISSING_TOLERANT_KINDS]
    if strict:
        raise BundleError(f"features not sampled on this device: {listed} ({', '.join(strict)} needs every feature)",
                          "features")
    if len(missing) == len(bases):
        raise BundleError(f"features not sampled on this device: {listed} (none of the model's features)", "features")
    if "forest" in kinds:
        medians = ((forest_meta or {}).get("baseline") or {}).get("median")
        if not isinstance(medians, list) or len(medians) != len((forest_meta or {}).get("feature_names") or ()):
            raise BundleError(f"features not sampled on this device: {listed} (the forest has no training "
                              "medians to stand in for them)", "features")
    return missing


# -- building (fleet side, but pure: no key files here) -------------------------------
def make_manifest(*, kinds: Sequence[str], version: int, target: Target, feature_names: Sequence[str],
                  interval_s: float, created_at_s: float, key_id: str, files: Mapping[str, bytes],
                  expires_at_s: float | None = None, limits: BundleLimits = BundleLimits(),
                  allow_local: bool = False) -> bytes:
    """Canonical manifest bytes for ``files`` ({'<kind>/<name>': bytes}); checked like a device would."""
    arts = [{"path": p, "kind": p.split("/", 1)[0], "sha256": sha256_hex(b), "size_bytes": len(b)}
            for p, b in sorted(files.items())]
    doc: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kinds": list(kinds),
        "version": int(version),
        "target": target.as_dict(),
        "feature_names": list(feature_names),
        "interval_s": float(interval_s),
        "created_at": iso_utc(created_at_s),
        "key_id": key_id,
        "artefacts": arts,
    }
    if expires_at_s is not None:
        doc["expires_at"] = iso_utc(expires_at_s)
    manifest_from_dict(json.loads(canonical_json(doc)), limits, allow_local)
    for p, b in files.items():
        check_content(p, b, limits)
    return canonical_json(doc)


def sign(manifest_bytes: bytes, private_key: Any) -> bytes:
    """``private_key``: a cryptography Ed25519PrivateKey."""
    sig = private_key.sign(manifest_bytes)
    assert len(sig) == SIGNATURE_BYTES
    return sig


def pack(manifest_bytes: bytes, signature: bytes, files: Mapping[str, bytes], mtime_s: float = 0.0) -> bytes:
    """Write the tar deterministically (fixed owner/mode/order). No validation: see build_bundle."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, blob in [(MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature), *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mode = 0o644
            info.mtime = int(mtime_s)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def build_bundle(*, private_key: Any, files: Mapping[str, bytes], version: int, target: Target,
                 feature_names: Sequence[str], interval_s: float, created_at_s: float,
                 expires_at_s: float | None = None, limits: BundleLimits = BundleLimits()) -> bytes:
    """Manifest + signature + tar, refusing anything a device would refuse."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw_pub = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    kinds = sorted({p.split("/", 1)[0] for p in files})
    for p in files:
        check_artefact_name(p, limits)
    manifest_bytes = make_manifest(kinds=kinds, version=version, target=target, feature_names=feature_names,
                                   interval_s=interval_s, created_at_s=created_at_s, key_id=key_id_of(raw_pub),
                                   files=files, expires_at_s=expires_at_s, limits=limits)
    data = pack(manifest_bytes, sign(manifest_bytes, private_key), files, created_at_s)
    if len(data) > limits.max_bundle_bytes:
        raise BundleError(f"bundle too large ({len(data)} bytes > limit {limits.max_bundle_bytes})", "size")
    return data


def summary(manifest: Manifest) -> dict[str, Any]:
    """What an operator wants to see before trusting a bundle."""
    return {
        "format_version": manifest.format_version,
        "kinds": list(manifest.kinds),
        "version": manifest.version,
        "target": manifest.target.label,
        "features": len(manifest.feature_names),
        "feature_names": list(manifest.feature_names),
        "interval_s": manifest.interval_s,
        "created_at": manifest.created_at,
        "expires_at": manifest.expires_at,
        "key_id": manifest.key_id,
        "artefacts": [f"{a.path} {a.size_bytes} B sha256:{a.sha256[:16]}" for a in manifest.artefacts],
    }
