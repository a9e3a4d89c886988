"""What ``edge-fleet keygen | bundle | verify`` do, as functions (fleet/cli.py owns argparse).

Artefact inputs for ``bundle`` (each positional argument):

    DIR with model.json           one kind (model.json "kind"): every regular file in DIR
    DIR without model.json        each sub-directory holding a model.json is one kind
    FILE ...                      the files given form one kind: the "kind" of a model.json
                                  among them, or ``--kind``

Feature names come from each model.json ("feature_names", or "inputs" for a
forecaster), merged in order, unless ``--features`` is given; ``interval_s`` from
model.json "interval_s" unless ``--interval-s`` is given. A model.json whose
"version" differs from ``--version`` is an error: the device reports the version
inside model.json, and two numbers for one model would mislead the operator.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fleet.keys import KeyFileError, generate, load_public_keys, load_signing_key
from models.bundle import (
    BundleError, BundleLimits, Manifest, VerifiedBundle, build_bundle, parse_bundle, parse_target, summary,
    verify_bundle,
)

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
META_FILE = "model.json"


class BundleUsageError(ValueError):
    """Bad inputs to ``bundle``/``verify`` (paths, versions, durations); one line for the user."""


def parse_duration_s(text: str) -> float:
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        raise BundleUsageError(f"expected a duration such as 12h, 7d or 2w, got {text!r}")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def keygen(out_dir: str | Path, name: str) -> tuple[Path, Path, str]:
    return generate(out_dir, name)


@dataclass(frozen=True)
class KindInput:
    kind: str
    files: dict[str, bytes]          # file name -> bytes
    meta: dict[str, Any] | None      # parsed model.json, when present


def _read_regular(path: Path) -> bytes:
    if path.is_symlink() or not path.is_file():
        raise BundleUsageError(f"{path}: not a regular file (symlinks are not followed)")
    return path.read_bytes()


def _meta_of(files: dict[str, bytes], where: str) -> dict[str, Any] | None:
    if META_FILE not in files:
        return None
    try:
        meta = json.loads(files[META_FILE].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BundleUsageError(f"{where}/{META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict):
        raise BundleUsageError(f"{where}/{META_FILE} is not a JSON object")
    return meta


def _dir_input(d: Path, kind: str | None) -> KindInput:
    files: dict[str, bytes] = {}
    for p in sorted(d.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() and not p.is_symlink():
            raise BundleUsageError(f"{p}: sub-directories are not part of a model directory")
        files[p.name] = _read_regular(p)
    meta = _meta_of(files, str(d))
    k = kind or (meta or {}).get("kind")
    if not isinstance(k, str) or not k:
        raise BundleUsageError(f"{d}: no {META_FILE} with a \"kind\"; pass --kind")
    return KindInput(k, files, meta)


def collect_inputs(paths: Sequence[str | Path], kind: str | None = None) -> list[KindInput]:
    """Positional arguments -> one KindInput per model kind (see the module docstring)."""
    groups: list[KindInput] = []
    loose: dict[str, bytes] = {}
    for raw in paths:
        p = Path(raw)
        if not os.path.lexists(p):
            raise BundleUsageError(f"{p}: no such file or directory")
        if p.is_dir() and not p.is_symlink():
            if (p / META_FILE).exists() or kind:
                groups.append(_dir_input(p, kind))
                continue
            subs = [s for s in sorted(p.iterdir()) if s.is_dir() and (s / META_FILE).exists()]
            if not subs:
                raise BundleUsageError(f"{p}: neither a model directory ({META_FILE}) nor a directory of them")
            groups.extend(_dir_input(s, None) for s in subs)
        else:
            if p.name in loose:
                raise BundleUsageError(f"{p}: two input files are named {p.name!r}")
            loose[p.name] = _read_regular(p)
    if loose:
        meta = _meta_of(loose, "(files)")
        k = kind or (meta or {}).get("kind")
        if not isinstance(k, str) or not k:
            raise BundleUsageError(f"cannot tell the model kind of {sorted(loose)}: add a {META_FILE} or --kind")
        groups.append(KindInput(k, loose, meta))
    kinds = [g.kind for g in groups]
    dup = sorted({k for k in kinds if kinds.count(k) > 1})
    if dup:
        raise BundleUsageError(f"kind {dup[0]!r} given more than once")
    if not groups:
        raise BundleUsageError("no artefacts given")
    return groups


def _features_of(groups: Sequence[KindInput]) -> list[str]:
    names: list[str] = []
    for g in groups:
        meta = g.meta or {}
        for n in meta.get("feature_names") or meta.get("inputs") or []:
            if isinstance(n, str) and n not in names:
                names.append(n)
    return names


def _interval_of(groups: Sequence[KindInput]) -> float | None:
    values = {float(g.meta["interval_s"]) for g in groups
              if g.meta and isinstance(g.meta.get("interval_s"), (int, float))}
    if len(values) > 1:
        raise BundleUsageError(f"model.json files disagree on interval_s {sorted(values)}; pass --interval-s")
    return values.pop() if values else None


def make_bundle(*, key_path: str | Path, version: int, target: str, out: str | Path,
                inputs: Sequence[str | Path], expires_in: str | None = None, kind: str | None = None,
                interval_s: float | None = None, features: Sequence[str] | None = None, force: bool = False,
                now_s: float | None = None, limits: BundleLimits = BundleLimits()) -> Manifest:
    """Build, sign and write a bundle atomically; returns its manifest."""
    if version < 1:
        raise BundleUsageError(f"--version must be >= 1, got {version}")
    try:
        tgt = parse_target(target)
    except ValueError as exc:
        raise BundleUsageError(str(exc)) from None
    out_path = Path(out)
    if os.path.lexists(out_path) and not force:
        raise BundleUsageError(f"{out_path} already exists (use --force to replace it)")
    signing = load_signing_key(key_path)
    groups = collect_inputs(inputs, kind)
    for g in groups:
        mv = (g.meta or {}).get("version")
        if mv is not None and mv != version:
            raise BundleUsageError(f"{g.kind}: model.json says version {mv} but --version is {version}")
    feats = list(features) if features else _features_of(groups)
    if not feats:
        raise BundleUsageError("no feature names in model.json; pass --features")
    interval = interval_s if interval_s is not None else _interval_of(groups)
    if interval is None:
        raise BundleUsageError("no interval_s in model.json; pass --interval-s")
    now = time.time() if now_s is None else now_s
    expires = now + parse_duration_s(expires_in) if expires_in else None
    files = {f"{g.kind}/{name}": blob for g in groups for name, blob in g.files.items()}
    data = build_bundle(private_key=signing.private_key, files=files, version=version, target=tgt,
                        feature_names=feats, interval_s=interval, created_at_s=now, expires_at_s=expires,
                        limits=limits)
    manifest = parse_bundle(data, limits)[0]
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleUsageError(f"cannot write {out_path}: {exc.strerror}") from None
    log.info("bundle %s: %s v%d for %s, %d bytes", out_path, ",".join(manifest.kinds), version,
             tgt.label, len(data))
    return manifest


def verify_file(path: str | Path, pub_paths: Sequence[str | Path], now_s: float | None = None,
                limits: BundleLimits = BundleLimits()) -> VerifiedBundle:
    """Everything a device checks that does not depend on the device (target, version, features)."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise BundleUsageError(f"cannot read {p}: {exc.strerror}") from None
    if size > limits.max_bundle_bytes:
        raise BundleError(f"bundle too large ({size} bytes > limit {limits.max_bundle_bytes})", "size")
    trusted = load_public_keys([str(x) for x in pub_paths])
    return verify_bundle(p.read_bytes(), trusted, limits, time.time() if now_s is None else now_s)


def summary_lines(manifest: Manifest) -> list[str]:
    s = summary(manifest)
    lines = [
        f"kinds       {', '.join(s['kinds'])}",
        f"version     {s['version']}",
        f"target      {s['target']}",
        f"features    {s['features']}: {', '.join(s['feature_names'])}",
        f"interval_s  {s['interval_s']:g}",
        f"created_at  {s['created_at']}",
        f"expires_at  {s['expires_at'] or '-'}",
        f"key_id      {s['key_id']}",
    ]
    lines += [f"artefact    {a}" for a in s["artefacts"]]
    return lines


__all__ = ["BundleUsageError", "KeyFileError", "collect_inputs", "keygen", "make_bundle", "parse_duration_s",
           "summary_lines", "verify_file"]
