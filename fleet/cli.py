"""``edge-fleet``: the cloud-side command line.

Each command is one ``_cmd_*`` function taking the parsed arguments and
returning an exit code. Exit codes: 0 success, 1 a check failed (``verify``
refused the bundle, ``publish`` could not deliver it or refused to send it),
2 usage, input or key-file errors - printed on one line,
never a traceback, because the reader is an operator at a terminal or a timer's
journal.

The fleet-loop commands (collect, alerts, train, models, drift, retrain) live
in fleet/commands.py, which registers its own parsers and handlers here.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, NoReturn, Sequence

from agent.cliopts import GlobalOptions, option

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


# Accepted by every subcommand, before or after its name (agent/cliopts.py); add new global options here.
GLOBAL_OPTIONS = GlobalOptions(
    option("--config", metavar="PATH",
           help="fleet TOML (default: $EDGE_FLEET_CONFIG, /etc/edge-fleet/fleet.toml, built-in)"),
    option("-v", "--verbose", action="count", default=0, help="progress logs (-vv: debug)"),
    option("-q", "--quiet", action="store_true", default=False,
           help="no progress bar (there is none anyway when stderr is not a terminal)"),
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (exit 2) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# -- bundle signing: keygen / bundle / verify ---------------------------------------------
def _cmd_keygen(args: argparse.Namespace) -> int:
    from fleet.bundle_cli import keygen

    key_path, pub_path, key_id = keygen(args.out, args.name)
    print(f"private key {key_path} (mode 0600, keep it off devices)")
    print(f"public key  {pub_path} (copy to devices, list it in [models] trusted_keys)")
    print(f"key id      {key_id}")
    return EXIT_OK


def _cmd_bundle(args: argparse.Namespace) -> int:
    from fleet.bundle_cli import make_bundle, summary_lines

    features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
    manifest = make_bundle(key_path=args.key, version=args.version, target=args.target, out=args.out,
                           inputs=args.artefacts, expires_in=args.expires_in, kind=args.kind,
                           interval_s=args.interval_s, features=features, force=args.force)
    print(f"wrote {args.out}")
    for line in summary_lines(manifest):
        print(line)
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    from fleet.bundle_cli import summary_lines, verify_file
    from models.bundle import BundleError, summary

    try:
        verified = verify_file(args.bundle, args.pub)
    except BundleError as exc:
        print(f"REFUSED: {exc.reason}")
        return EXIT_CHECK_FAILED
    if args.json:
        print(json.dumps({**summary(verified.manifest), "ok": True, "bundle_sha256": verified.bundle_sha256}))
    else:
        for line in summary_lines(verified.manifest):
            print(line)
        print("OK")
    return EXIT_OK


def _cmd_publish(args: argparse.Namespace) -> int:
    from fleet.publish import BrokerParams, destination, publish_bundle

    target = destination(args.device, args.group, args.fleet)
    broker = BrokerParams(host=args.host, port=args.port, username=args.username or "",
                          password=args.password or "", tls_ca=args.tls_ca or "", tls_cert=args.tls_cert or "",
                          tls_key=args.tls_key or "", protocol=args.protocol, timeout_s=args.timeout_s)
    topic, what = publish_bundle(args.bundle, target, broker, topic_prefix=args.topic_prefix, clear=args.clear,
                                 pub_paths=args.pub or ())
    print(f"published to {topic} (retained, QoS 1): {what}")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keygen": _cmd_keygen,
    "bundle": _cmd_bundle,
    "verify": _cmd_verify,
    "publish": _cmd_publish,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-fleet", description="Fleet side: keys, signed model bundles, training, alerts.")
    from agent import __version__

    parser.add_argument("--version", action="version", version=f"edge-fleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("keygen", help="create an ed25519 key pair for signing model bundles")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for NAME.key and NAME.pub")
    p.add_argument("--name", default="bundle-signing", help="file name stem (default: bundle-signing)")

    p = sub.add_parser("bundle", help="build and sign a model bundle")
    p.add_argument("--key", required=True, metavar="KEY", help="private key (PEM, mode 0600)")
    p.add_argument("--version", required=True, type=int, metavar="N", help="model version (grows per target+kind)")
    p.add_argument("--target", required=True, metavar="TARGET", help="device:ID, group:NAME or fleet")
    p.add_argument("--expires-in", metavar="AGE", help="refuse the bundle after this long, e.g. 7d")
    p.add_argument("--kind", help="model kind of loose files or a directory without model.json")
    p.add_argument("--interval-s", type=float, metavar="S", help="sampling interval (default: model.json)")
    p.add_argument("--features", metavar="A,B", help="feature names (default: from model.json)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--out", required=True, metavar="FILE", help="bundle file to write")
    p.add_argument("artefacts", nargs="+", metavar="ARTEFACT_DIR_OR_FILES", help="model directories or files")

    p = sub.add_parser("verify", help="check a bundle's signature, hashes and contents")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle file to check")
    p.add_argument("--pub", required=True, nargs="+", metavar="P", help="trusted public key file(s)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    p = sub.add_parser("publish", help="publish a bundle retained (QoS 1) to a device, a group or the fleet")
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help="bundle file (omit with --clear)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--device", metavar="ID", help="one device: <topic prefix>/models")
    where.add_argument("--group", metavar="G", help="a group: fleet/G/models")
    where.add_argument("--fleet", action="store_true", help="every device: fleet/all/models")
    p.add_argument("--clear", action="store_true", help="remove the retained bundle (empty retained message)")
    p.add_argument("--pub", nargs="+", metavar="P", help="also verify signature and hashes with these public keys")
    p.add_argument("--host", default="localhost", help="broker host (default: localhost)")
    p.add_argument("--port", type=int, default=1883, help="broker port (default: 1883)")
    p.add_argument("--username", help="broker user name")
    p.add_argument("--password", help="broker password")
    p.add_argument("--tls-ca", metavar="FILE", help="CA certificate; turns TLS on")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", metavar="FILE", help="client private key (mutual TLS)")
    p.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1", help="MQTT version (default: 3.1.1)")
    p.add_argument("--topic-prefix", default="devices/{device_id}",
                   help="device topic prefix template, as the agent's mqtt.topic_prefix (default: devices/{device_id})")
    p.add_argument("--timeout-s", type=float, default=10.0, metavar="S", help="connect and PUBACK timeout")

    from fleet.commands import register as register_fleet_loop

    COMMANDS.update(register_fleet_loop(sub))
    from fleet.serve import register as register_serve; COMMANDS.update(register_serve(sub))  # noqa: E702
    from fleet.maintenance_cli import register as register_maintenance; COMMANDS.update(register_maintenance(sub))  # noqa: E702,E501
    from fleet.clusters import register as register_clusters; COMMANDS.update(register_clusters(sub))  # noqa: E702
    return GLOBAL_OPTIONS.install(parser)


def main(argv: Sequence[str] | None = None) -> int:
    from fleet.bundle_cli import BundleUsageError
    from fleet.keys import KeyFileError
    from fleet.publish import PublishError
    from models.bundle import BundleError

    parser = build_parser()
    try:
        args = GLOBAL_OPTIONS.parse(parser, argv)
    except SystemExit as exc:  # --help (0) or a usage error already printed (2)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else EXIT_USAGE
    from agent import logsetup

    if not logging.getLogger().handlers:  # like basicConfig: an embedding program's handlers stay
        logsetup.setup("WARNING")  # the agent's format: UTC timestamps, level, logger
    try:
        return COMMANDS[args.command](args)
    except (BundleUsageError, KeyFileError, BundleError) as exc:
        print(f"edge-fleet {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PublishError as exc:
        print(f"edge-fleet {args.command}: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except OSError as exc:
        print(f"edge-fleet {args.command}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
