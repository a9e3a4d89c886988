"""Run the README's fenced ``sh`` blocks as a user would, so the README cannot drift from the code.

Every ``## section`` of README.md that has ```` ```sh ```` blocks is one test: its blocks,
in order, become one bash script (``set -euo pipefail``, so a failing command fails the
test) run in a temporary directory laid out like a fresh clone: the repository's TOML
files and Makefile, and ``.venv/bin`` holding wrappers for the interpreter's tools
(``edge-agent``, ``edge-fleet``, ``python``, ``sqlite-utils`` ...) running this checkout's
code. Nothing in the README is special-cased here; the few generic adaptations are:

- ``make test`` is dropped (it is what runs this test) and ``make TARGET`` runs the
  target's recipe from the Makefile (its variables expanded; no venv is built);
- the broker the README talks to (port 1883) is a real mosquitto on a free port;
- time runs ``TIME_SCALE`` times faster: the agent samples every ``1 / TIME_SCALE`` s
  (``EDGE_AGENT_AGENT_INTERVAL_S``) and ``sleep N`` longer than 2 s sleeps ``N / TIME_SCALE``
  (at least 2 s).

A block can carry a directive, an HTML comment on the line before its fence:

- ``<!-- doctest: skip: REASON -->``: not run; the reason is required (say which test covers it);
- ``<!-- doctest: background -->``: runs in the background (a foreground service such as
  ``make run``) while the rest of the section runs; the first command after it is retried
  until it succeeds (the service is up), and at the end of the section the block gets
  Ctrl-C (SIGINT) and must exit 0.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TIME_SCALE = 8.0
BROKER_PORT_IN_README = 1883
SCRIPT_TIMEOUT_S = 600.0
RETRY_FIRST_COMMAND_S = 120

_DIRECTIVE = re.compile(r"^<!--\s*doctest:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    section: str
    line: int                 # 1-based line of the opening fence in README.md
    text: str
    directive: str            # "" / "background" / "skip: reason"

    @property
    def skipped(self) -> bool:
        return self.directive.startswith("skip")


def blocks(readme: Path = README) -> list[Block]:
    """Every ```sh block with its section and directive."""
    lines = readme.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```sh":
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            m = _DIRECTIVE.match(lines[k].strip()) if k >= 0 else None
            out.append(Block(section, i + 1, "\n".join(lines[i + 1:j]), m.group(1) if m else ""))
            i = j
        i += 1
    return out


def sections(readme: Path = README) -> dict[str, list[Block]]:
    found: dict[str, list[Block]] = {}
    for b in blocks(readme):
        found.setdefault(b.section, []).append(b)
    return found


# -- Makefile recipes ------------------------------------------------------------------------
def make_recipe(target: str, makefile: Path = REPO / "Makefile") -> str:
    """The recipe of ``target`` with the Makefile's simple variables expanded (``@`` dropped)."""
    text = makefile.read_text(encoding="utf-8")
    variables = dict(re.findall(r"^([A-Z_]+)\s*[?:]?=\s*(.*?)\s*$", text, flags=re.M))
    m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)*)", text, flags=re.M)
    if m is None:
        raise ValueError(f"Makefile has no target {target!r}")

    def expand(s: str) -> str:
        for _ in range(5):
            s = re.sub(r"\$\((\w+)\)", lambda v: variables.get(v.group(1), ""), s)
        return s

    return "\n".join(expand(r[1:].lstrip("@")) for r in m.group(1).splitlines() if r.strip())


# -- adaptation --------------------------------------------------------------------------------
def adapt(text: str, broker_port: int) -> str:
    """The generic adaptations of the module docstring, line by line."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^make\s+([\w-]+)(.*)$", line)
        if m:
            if m.group(1) == "test":
                continue
            out.append(make_recipe(m.group(1)) + "   " + m.group(2).strip())
            continue
        line = re.sub(rf"\b{BROKER_PORT_IN_README}\b", str(broker_port), line)
        line = re.sub(r"\bsleep\s+(\d+(?:\.\d+)?)\b",
                      lambda s: f"sleep {_scaled(float(s.group(1))):g}", line)
        out.append(line)
    return "\n".join(out)


def _scaled(seconds: float) -> float:
    return seconds if seconds <= 2 else max(2.0, seconds / TIME_SCALE)


def _first_command(text: str) -> tuple[str, str]:
    """(first command line, the rest): blank lines and comments are not commands."""
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            return line, "\n".join(lines[n + 1:])
    return "", text


def script(section_blocks: list[Block], broker_port: int, workdir: Path) -> str:
    """One bash script for a section (see the module docstring)."""
    parts = ["set -euo pipefail", "set -m   # each background job in its own process group",
             'trap \'for p in $(jobs -p); do kill -TERM -- -"$p" 2>/dev/null || true; done\' EXIT',
             f"__started=$PWD",
             "__retry() {  # the first command after a background service: until the service answers",
             f"  local n=0; until eval \"$1\"; do n=$((n + 1)); [ $n -lt {RETRY_FIRST_COMMAND_S * 2} ] || return 1; "
             "sleep 0.5; done; }"]
    backgrounds: list[str] = []
    retry_next = False
    for n, b in enumerate(section_blocks):
        if b.skipped:
            continue
        body = adapt(b.text, broker_port)
        parts.append(f"# --- README.md line {b.line} ---")
        if b.directive == "background":
            bg = workdir / f"background-{n}.sh"
            bg.write_text(body + "\n", encoding="utf-8")
            var = f"__bg{n}"
            parts.append(f'bash {shlex.quote(str(bg))} > "$__started/background-{n}.log" 2>&1 & {var}=$!')
            backgrounds.append(var)
            retry_next = True
            continue
        if b.directive:
            raise ValueError(f"README.md line {b.line}: unknown doctest directive {b.directive!r}")
        if retry_next:
            first, body = _first_command(body)
            parts.append(f"__retry {shlex.quote(first)}")
            retry_next = False
        parts.append(body)
    for var in backgrounds:   # Ctrl-C: the service flushes and exits 0
        parts.append(f'kill -INT -- -"${var}"; __rc=0; wait "${var}" || __rc=$?; '
                     f'[ $__rc -eq 0 ] || {{ echo "background block exited $__rc" >&2; exit 1; }}')
    return "\n".join(parts) + "\n"


# -- the fresh clone ---------------------------------------------------------------------------
def fresh_clone(root: Path) -> dict[str, str]:
    """Lay out ``root`` like a clone after ``make``; returns the environment to run the script in."""
    for toml in REPO.glob("*/*.toml"):
        dest = root / toml.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(toml.read_bytes())
    (root / "Makefile").write_bytes((REPO / "Makefile").read_bytes())
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    real_bin = Path(sys.executable).parent
    for tool in sorted(real_bin.iterdir()):
        if tool.is_file() and os.access(tool, os.X_OK):
            wrapper = bin_dir / tool.name
            target = sys.executable if tool.name.startswith("python") else str(tool)
            wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(target)} \"$@\"\n", encoding="utf-8")
            wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    (root / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_AGENT_", "EDGE_FLEET_"))}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(root / "tmp"), PYTHONDONTWRITEBYTECODE="1",
               EDGE_AGENT_AGENT_INTERVAL_S=f"{1 / TIME_SCALE:g}", EDGE_AGENT_STORE_COMMIT_INTERVAL_S="0.5")
    env.pop("XDG_STATE_HOME", None)
    return env


def run_section(section_blocks: list[Block], root: Path, broker_port: int) -> subprocess.CompletedProcess:
    env = fresh_clone(root)
    text = script(section_blocks, broker_port, root)
    (root / "doctest.sh").write_text(text, encoding="utf-8")
    proc = subprocess.Popen(["bash", str(root / "doctest.sh")], cwd=root, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(timed out after {SCRIPT_TIMEOUT_S:g} s)"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
