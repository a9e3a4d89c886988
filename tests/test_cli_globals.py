"""Global options before or after the subcommand, for edge-agent and edge-fleet (agent/cliopts.py).

The parsers are the real ones; the walk over subparsers is checked on every
subcommand the CLIs have, so a subcommand added later is covered without a new test.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from agent import cli as agent_cli
from agent.cliopts import GlobalOptions, option, walk
from fleet import cli as fleet_cli

REPO = Path(__file__).resolve().parents[1]


def _leaf_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every runnable command path (("models", "list"), ("run",), ...) of a parser tree."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix]
    out: list[tuple[str, ...]] = []
    for name, sub in subs[0].choices.items():
        out.extend(_leaf_paths(sub, prefix + (name,)))
    return out


@pytest.mark.parametrize("module", [agent_cli, fleet_cli], ids=["edge-agent", "edge-fleet"])
def test_every_parser_level_accepts_every_global_option(module) -> None:
    parser = module.build_parser()
    levels = list(walk(parser))
    assert len(levels) > 10
    for p in levels:
        for opt in module.GLOBAL_OPTIONS.options:
            assert any(f in p._option_string_actions for f in opt.flags), (p.prog, opt.flags)


@pytest.mark.parametrize("module", [agent_cli, fleet_cli], ids=["edge-agent", "edge-fleet"])
def test_config_before_between_and_after_the_subcommand(module) -> None:
    parser = module.build_parser()
    paths = _leaf_paths(parser)
    assert paths
    for path in paths:
        leaf = parser
        for name in path:
            leaf = next(a for a in leaf._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        # the leaf's own required arguments: parse_known_args on the leaf tells which are missing
        positions = [a for a in leaf._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
                     and a.nargs not in ("?", "*")]
        filler = ["1"] * len(positions)
        required = [a for a in leaf._actions if a.option_strings and a.required]
        for a in required:
            filler += [a.option_strings[0], "1"]
        groups = [g for g in leaf._mutually_exclusive_groups if g.required]
        for g in groups:
            a = g._group_actions[0]
            filler += [a.option_strings[0]] + ([] if a.nargs == 0 else ["1"])
        for at in range(len(path) + 1):   # before the command, after each level of it
            argv = [*path[:at], "--config", "c.toml", *path[at:], *filler]
            ns = module.GLOBAL_OPTIONS.parse(parser, argv)
            assert ns.config == "c.toml", argv
        ns = module.GLOBAL_OPTIONS.parse(parser, [*path, *filler])
        assert ns.config is None and ns.quiet is False, path


def test_the_value_given_last_wins_and_counts_work_at_any_level() -> None:
    parser = fleet_cli.build_parser()
    ns = fleet_cli.GLOBAL_OPTIONS.parse(parser, ["--config", "a.toml", "models", "list", "--config", "b.toml"])
    assert ns.config == "b.toml"
    assert fleet_cli.GLOBAL_OPTIONS.parse(parser, ["-vv", "drift"]).verbose == 2
    assert fleet_cli.GLOBAL_OPTIONS.parse(parser, ["drift", "-v"]).verbose == 1
    assert fleet_cli.GLOBAL_OPTIONS.parse(parser, ["drift"]).verbose == 0
    assert agent_cli.GLOBAL_OPTIONS.parse(agent_cli.build_parser(), ["-q", "replay", "x.csv", "--out", "y"]).quiet


def test_a_subcommand_reusing_a_global_flag_for_something_else_is_refused_at_build_time() -> None:
    parser = argparse.ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("ok").add_argument("--config", help="declared locally too: tolerated")
    sub.add_parser("bad").add_argument("-q", dest="query")
    opts = GlobalOptions(option("--config"), option("-q", "--quiet", action="store_true", default=False))
    with pytest.raises(ValueError, match="global option"):
        opts.install(parser)


def test_a_local_declaration_of_a_global_option_does_not_reset_the_earlier_value() -> None:
    parser = argparse.ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("ok").add_argument("--config", default="local-default")
    opts = GlobalOptions(option("--config", default="built-in"))
    opts.install(parser)
    assert opts.parse(parser, ["--config", "x", "ok"]).config == "x"
    assert opts.parse(parser, ["ok"]).config == "built-in"


def test_edge_agent_config_before_run_reaches_the_command(tmp_path: Path) -> None:
    """The reported failure: `edge-agent --config FILE status` was `invalid choice: 'FILE'`."""
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[agent]\ndevice_id = "glob-1"\nstate_dir = "{tmp_path / "state"}"\n')
    for argv in (["--config", str(cfg), "status", "--json"], ["status", "--json", "--config", str(cfg)]):
        proc = subprocess.run([sys.executable, "-m", "agent.cli", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr      # a stopped agent is unhealthy, but it ran
        assert '"device_id": "glob-1"' in proc.stdout


def test_edge_fleet_config_before_a_nested_group(tmp_path: Path) -> None:
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'[fleet]\nstate_dir = "{tmp_path / "fleet"}"\n')
    outs = []
    for argv in (["--config", str(cfg), "models", "list"], ["models", "--config", str(cfg), "list"],
                 ["models", "list", "--config", str(cfg)]):
        proc = subprocess.run([sys.executable, "-m", "fleet.cli", *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert outs == ["no models\n"] * 3
    assert (tmp_path / "fleet" / "fleet.db").exists()
