"""A throwaway PostgreSQL server for tests: initdb + pg_ctl in a temp dir, unix socket only.

    from tests.pg import postgres_server, postgres_url   # noqa: F401  (fixtures)

    postgres_server   session: one server (.url(dbname), .base, .port, .stop())
    postgres_url      function: a fresh, empty database on it, as a postgresql:// URL

The server binaries come from the ``postgresql`` package (/usr/lib/postgresql/<v>/bin
on Debian/Ubuntu, or initdb/pg_ctl on the PATH); without them the tests skip and say
so. With them but without the psycopg driver the tests fail: that is a broken setup. PostgreSQL refuses to run as root, so as root (CI containers) initdb and pg_ctl
run as the ``postgres`` user the package creates (``subprocess`` ``user=``), in a
temp dir that user owns. No TCP listener: a unix socket in the temp dir, on a free
port number, so parallel sessions never collide. fsync is off: the data is thrown away.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest


def find_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2])
                        if p.split("/")[-2].isdigit() else 0, reverse=True)
    for d in candidates:
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return Path(d)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> str | None:
    """The user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


class PostgresServer:
    user = "fleet"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.run_as = _run_as()
        if os.geteuid() == 0 and self.run_as is None:
            raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
        self.base = Path(tempfile.mkdtemp(prefix="edge-fleet-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = _free_port()
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        kwargs = {"user": self.run_as} if self.run_as else {}
        return subprocess.run([str(a) for a in args], cwd=self.base, capture_output=True, text=True,
                              timeout=timeout_s, check=False, **kwargs)

    def start(self) -> None:
        r = self._run(self.bindir / "initdb", "-D", self.data, "-U", self.user, "--auth=trust", "-E", "UTF8",
                      "--locale=C", "-N")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")
        opts = f"-p {self.port} -k {self.base} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
        r = self._run(self.bindir / "pg_ctl", "-D", self.data, "-o", opts, "-l", self.log, "-w", "-t", "30",
                      "start")
        if r.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()}\n{log}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.base}&port={self.port}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install the 'postgresql' package")
    try:
        import psycopg  # noqa: F401
    except ImportError:   # the server is there, so the PostgreSQL path must be tested: say what is missing
        pytest.fail("PostgreSQL is installed but the psycopg driver is not: pip install 'psycopg[binary]' "
                    "(it belongs to the test extra)", pytrace=False)
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()
