"""The bundle format, key files and ``edge-fleet keygen | bundle | verify`` (real keys, real files)."""
from __future__ import annotations

import gzip
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fleet import cli
from fleet.keys import KeyFileError, generate, load_signing_key
from models.bundle import (
    BundleError, BundleLimits, Target, build_bundle, key_id_of, load_trusted_keys, pack, parse_bundle,
    parse_iso_s, parse_public_key_pem, parse_target, read_members, sign, verify_bundle,
)

REPO = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000.0


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    assert cli.main(["keygen", "--out", str(d), "--name", "fleet"]) == 0
    return d


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "forest"
    d.mkdir()
    np.savez_compressed(d / "forest.npz", threshold=np.linspace(0, 1, 50), children_left=np.arange(50, dtype=np.int32))
    (d / "model.json").write_text(json.dumps({"kind": "forest", "version": 3, "interval_s": 1.0,
                                              "feature_names": ["system.cpuUsage", "system.load1|mean10"]}))
    return d


def good_files() -> dict[str, bytes]:
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(5.0))
    return {"forest/forest.npz": buf.getvalue(), "forest/model.json": b'{"kind": "forest"}'}


def build(key, files=None, **kw) -> bytes:
    args = dict(private_key=key, files=files or good_files(), version=1, target=Target("fleet", "all"),
                feature_names=["system.cpuUsage"], interval_s=1.0, created_at_s=NOW)
    args.update(kw)
    return build_bundle(**args)


# -- keys -------------------------------------------------------------------------------
def test_keygen_writes_0600_key_and_refuses_to_overwrite(keydir: Path, capsys: pytest.CaptureFixture) -> None:
    key, pub = keydir / "fleet.key", keydir / "fleet.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in key.read_bytes() and b"BEGIN PUBLIC KEY" in pub.read_bytes()
    before = key.read_bytes()
    capsys.readouterr()
    assert cli.main(["keygen", "--out", str(keydir), "--name", "fleet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1 and "Traceback" not in err
    assert key.read_bytes() == before
    pub.unlink()                                   # even a lone .key blocks a new pair of that name
    with pytest.raises(KeyFileError, match="already exists"):
        generate(keydir, "fleet")
    with pytest.raises(KeyFileError, match="must match"):
        generate(keydir, "../evil")


def test_key_id_is_the_fingerprint_of_the_public_key(keydir: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    signing = load_signing_key(keydir / "fleet.key")
    raw = signing.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert parse_public_key_pem((keydir / "fleet.pub").read_text()) == raw   # parsed without cryptography
    assert signing.key_id == key_id_of(raw) == next(iter(load_trusted_keys([keydir / "fleet.pub"])))


def test_private_key_readable_by_others_is_refused(keydir: Path) -> None:
    os.chmod(keydir / "fleet.key", 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(keydir / "fleet.key")


def test_non_ed25519_public_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pub").write_bytes(pem)
    with pytest.raises(ValueError, match="not an ed25519 key"):
        load_trusted_keys([tmp_path / "ec.pub"])
    with pytest.raises(ValueError, match="missing.pub"):
        load_trusted_keys([tmp_path / "missing.pub"])


# -- CLI --------------------------------------------------------------------------------
def test_cli_bundle_then_verify(tmp_path: Path, keydir: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b.tar"
    rc = cli.main(["bundle", "--key", str(keydir / "fleet.key"), "--version", "3", "--target", "group:lab",
                   "--expires-in", "7d", "--out", str(out), str(model_dir)])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["verify", str(out), "--pub", str(keydir / "fleet.pub")]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("OK")
    assert "group:lab" in text and "forest/forest.npz" in text and "system.load1|mean10" in text
    assert cli.main(["verify", str(out), "--pub", str(keydir / "fleet.pub"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["version"] == 3 and doc["kinds"] == ["forest"] and doc["expires_at"]
    manifest = parse_bundle(out.read_bytes())[0]
    assert abs(manifest.expires_at_s - parse_iso_s(manifest.created_at) - 7 * 86400) < 1
    # refusing to overwrite the output unless --force
    rc = cli.main(["bundle", "--key", str(keydir / "fleet.key"), "--version", "3", "--target", "group:lab",
                   "--out", str(out), str(model_dir)])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_cli_verify_refusals_exit_1_with_reason(tmp_path: Path, keydir: Path, model_dir: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b.tar"
    assert cli.main(["bundle", "--key", str(keydir / "fleet.key"), "--version", "3", "--target", "fleet",
                     "--out", str(out), str(model_dir)]) == 0
    assert cli.main(["keygen", "--out", str(keydir), "--name", "other"]) == 0
    capsys.readouterr()
    assert cli.main(["verify", str(out), "--pub", str(keydir / "other.pub")]) == 1
    assert "unknown key" in capsys.readouterr().out
    # tamper with the npz in place (same size): sha256 mismatch
    data = bytearray(out.read_bytes())
    idx = data.index(b"PK\x03\x04")
    data[idx + 40] ^= 0xFF
    out.write_bytes(bytes(data))
    assert cli.main(["verify", str(out), "--pub", str(keydir / "fleet.pub"), str(keydir / "other.pub")]) == 1
    assert "sha256 mismatch" in capsys.readouterr().out


def test_cli_expired_bundle_fails_verify(tmp_path: Path, keydir: Path, capsys: pytest.CaptureFixture) -> None:
    key = load_signing_key(keydir / "fleet.key").private_key
    out = tmp_path / "old.tar"
    out.write_bytes(build(key, created_at_s=NOW, expires_at_s=NOW + 3600))   # expired long ago
    assert cli.main(["verify", str(out), "--pub", str(keydir / "fleet.pub")]) == 1
    assert "expired" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["bundle", "--key", "K", "--version", "x", "--target", "fleet", "--out", "o", "a"], "invalid int"),
    (["bundle", "--version", "1", "--target", "fleet", "--out", "o", "a"], "--key"),
    (["frobnicate"], "invalid choice"),
    (["verify", "missing.tar", "--pub", "missing.pub"], "missing.tar"),
])
def test_cli_usage_errors_are_one_line_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_bundle_input_errors(tmp_path: Path, keydir: Path, model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["bundle", "--key", str(keydir / "fleet.key"), "--out", str(tmp_path / "b.tar")]
    cases = [
        (["--version", "4", "--target", "fleet", str(model_dir)], "model.json says version 3"),
        (["--version", "3", "--target", "planet:x", str(model_dir)], "target must be"),
        (["--version", "3", "--target", "group:all", str(model_dir)], "reserved"),
        (["--version", "3", "--target", "fleet", "--expires-in", "soon", str(model_dir)], "duration"),
        (["--version", "3", "--target", "fleet", str(tmp_path / "nope")], "no such file"),
    ]
    for extra, message in cases:
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    (model_dir / "model.pkl").write_bytes(b"\x80\x04K\x01.")
    assert cli.main(base + ["--version", "3", "--target", "fleet", str(model_dir)]) == 2
    assert "pickle" in capsys.readouterr().err
    os.chmod(keydir / "fleet.key", 0o640)
    assert cli.main(base + ["--version", "3", "--target", "fleet", str(model_dir)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_cli_multi_kind_directory_and_loose_files(tmp_path: Path, keydir: Path, model_dir: Path) -> None:
    root = tmp_path / "models"
    (root / "lstm").mkdir(parents=True)
    os.rename(model_dir, root / "forest")
    (root / "lstm" / "forecaster.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))
    (root / "lstm" / "model.json").write_text(json.dumps({"kind": "lstm", "version": 3, "interval_s": 1.0,
                                                          "inputs": ["system.cpuUsage", "time:tod_sin"]}))
    out = tmp_path / "multi.tar"
    assert cli.main(["bundle", "--key", str(keydir / "fleet.key"), "--version", "3", "--target", "device:pi-01",
                     "--out", str(out), str(root)]) == 0
    m = parse_bundle(out.read_bytes())[0]
    assert m.kinds == ("forest", "lstm")
    assert m.feature_names == ("system.cpuUsage", "system.load1|mean10", "time:tod_sin")
    assert {a.path for a in m.artefacts} == {"forest/forest.npz", "forest/model.json", "lstm/forecaster.tflite",
                                             "lstm/model.json"}
    # loose files with --kind and explicit features/interval
    out2 = tmp_path / "loose.tar"
    assert cli.main(["bundle", "--key", str(keydir / "fleet.key"), "--version", "9", "--target", "fleet",
                     "--kind", "zscore", "--features", "system.cpuUsage", "--interval-s", "5",
                     "--out", str(out2), str(root / "forest" / "forest.npz")]) == 0
    m2 = parse_bundle(out2.read_bytes())[0]
    assert m2.kinds == ("zscore",) and m2.interval_s == 5.0 and [a.path for a in m2.artefacts] == ["zscore/forest.npz"]


# -- format -----------------------------------------------------------------------------
def test_bundle_layout_is_a_plain_deterministic_tar(keydir: Path) -> None:
    key = load_signing_key(keydir / "fleet.key").private_key
    data = build(key)
    assert build(key) == data                                   # same inputs, same bytes
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        names = [(m.name, m.isreg(), m.uid, m.mode) for m in tf.getmembers()]
    assert names == [("manifest.json", True, 0, 0o644), ("manifest.sig", True, 0, 0o644),
                     ("forest/forest.npz", True, 0, 0o644), ("forest/model.json", True, 0, 0o644)]
    m, mbytes, sig, files = parse_bundle(data)
    assert json.loads(mbytes)["target"] == {"type": "fleet", "id": "all"} and len(sig) == 64
    assert m.key_id == load_signing_key(keydir / "fleet.key").key_id


def _forge(key, files: dict[str, bytes], extra_infos=()) -> bytes:
    """A manifest for ``files`` signed by ``key``, tar written by hand (the builder would refuse)."""
    from models.bundle import canonical_json, sha256_hex
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    doc = {"format_version": 1, "kinds": sorted({p.split("/")[0] for p in files}), "version": 1,
           "target": {"type": "fleet", "id": "all"}, "feature_names": [], "interval_s": 1.0,
           "created_at": "2023-11-14T22:13:20Z", "key_id": key_id_of(raw),
           "artefacts": [{"path": p, "kind": p.split("/")[0], "sha256": sha256_hex(b), "size_bytes": len(b)}
                         for p, b in sorted(files.items())]}
    mbytes = canonical_json(doc)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, blob in [("manifest.json", mbytes), ("manifest.sig", sign(mbytes, key)), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
        for info in extra_infos:
            tf.addfile(info, io.BytesIO(b"") if info.isreg() else None)
    return buf.getvalue()


def test_structural_refusals(keydir: Path) -> None:
    key = load_signing_key(keydir / "fleet.key").private_key
    trusted = load_trusted_keys([keydir / "fleet.pub"])
    good = build(key)
    assert verify_bundle(good, trusted, now_s=NOW).manifest.version == 1

    def refused(data: bytes, *words: str, limits: BundleLimits = BundleLimits()) -> None:
        with pytest.raises(BundleError) as exc:
            verify_bundle(data, trusted, limits, now_s=NOW)
        for w in words:
            assert w in exc.value.reason, (w, exc.value.reason)

    refused(gzip.compress(good), "uncompressed tar")
    refused(b"not a tar at all" * 100, "not a valid bundle")
    refused(good, "too many members", limits=BundleLimits(max_members=3))
    refused(good, "too large", limits=BundleLimits(max_file_bytes=100))
    d = tarfile.TarInfo("forest")
    d.type = tarfile.DIRTYPE
    refused(_forge(key, good_files(), [d]), "not a regular file")
    fifo = tarfile.TarInfo("forest/pipe.json")
    fifo.type = tarfile.FIFOTYPE
    refused(_forge(key, good_files(), [fifo]), "not a regular file")
    dup = tarfile.TarInfo("forest/model.json")
    refused(_forge(key, good_files(), [dup]), "duplicate member")
    # no signature / no manifest
    members = read_members(good)
    no_sig = pack(members["manifest.json"], b"", {k: v for k, v in members.items() if "/" in k})
    refused(no_sig, "signature")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("forest/model.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    refused(buf.getvalue(), "no manifest.json")
    # reserved, unknown or nested names
    refused(_forge(key, {**good_files(), "forest/bundle.manifest.json": b"{}"}), "reserved")
    refused(_forge(key, {**good_files(), "forest/run.sh": b"#!/bin/sh"}), "file type not allowed")
    refused(_forge(key, {**good_files(), "forest/sub/x.json": b"{}"}), "must be '<kind>/<file>'")
    refused(_forge(key, {"model.joblib": b"x"}), "pickle")
    refused(_forge(key, {"forest/weights.npy": _npy_object()}), "pickle")
    refused(_forge(key, {"lstm/forecaster.tflite": b"\x00" * 64}), "TFL3")


def _npy_object() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([1, "a", None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_builder_refuses_what_a_device_would(keydir: Path) -> None:
    key = load_signing_key(keydir / "fleet.key").private_key
    buf = io.BytesIO()
    np.savez(buf, x=np.array([object()], dtype=object))
    with pytest.raises(BundleError, match="object arrays"):
        build(key, files={"forest/forest.npz": buf.getvalue()})
    with pytest.raises(BundleError, match="pickle"):
        build(key, files={"forest/model.pickle": b"\x80\x04."})
    with pytest.raises(ValueError, match="target"):
        parse_target("everyone")
    assert parse_target("fleet") == Target("fleet", "all") and parse_target("device:pi-01").id == "pi-01"


def test_npz_zip_bomb_is_refused_before_loading(keydir: Path) -> None:
    key = load_signing_key(keydir / "fleet.key").private_key
    trusted = load_trusted_keys([keydir / "fleet.pub"])
    buf = io.BytesIO()
    np.savez_compressed(buf, z=np.zeros(4_000_000))           # 32 MB of zeros, ~30 kB compressed
    data = _forge(key, {"forest/forest.npz": buf.getvalue()})
    with pytest.raises(BundleError, match="unpacks to"):
        verify_bundle(data, trusted, BundleLimits(max_unpacked_bytes=8 * 1024 * 1024))
    # an .npy header that claims a terabyte (numpy would allocate it before reading): refused from the header
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f8", "fortran_order": False, "shape": (2**37,)})
    npy.write(bytes(16))
    for wrap in ("npz", "npy"):
        if wrap == "npz":
            zbuf = io.BytesIO()
            with zipfile.ZipFile(zbuf, "w") as zf:
                zf.writestr("x.npy", npy.getvalue())
            files = {"forest/forest.npz": zbuf.getvalue()}
        else:
            files = {"forest/weights.npy": npy.getvalue()}
        with pytest.raises(BundleError, match="unpacks to 1099511627776 bytes"):
            verify_bundle(_forge(key, files), trusted)


def test_daemon_import_path_does_not_load_cryptography(tmp_path: Path, keydir: Path) -> None:
    """cryptography is imported only when a bundle is verified, never at import or start-up."""
    code = (
        "import sqlite3, sys\n"
        "from agent.updates import ModelUpdater\n"
        f"u = ModelUpdater({str(tmp_path / 's')!r}, sqlite3.connect(':memory:', isolation_level=None),"
        f" [{str(keydir / 'fleet.pub')!r}], 'pi-01')\n"
        "assert 'cryptography' not in sys.modules, 'loaded at start-up'\n"
        "u.offer(b'junk')\n"
        "assert 'cryptography' not in sys.modules, 'loaded for junk'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
