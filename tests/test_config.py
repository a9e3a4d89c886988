import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent import config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_local_and_valid():
    cfg = config.parse({}, {})
    assert cfg.agent.interval_s == 1.0
    assert cfg.device_id  # host name when not configured
    assert not str(cfg.agent.state_dir).startswith("/var")
    assert cfg.db_path == cfg.agent.state_dir / "agent.db"


def test_file_values_and_env_overrides():
    data = {"agent": {"device_id": "pi-7", "interval_s": 2, "groups": ["barn"]}, "mqtt": {"port": 8883}}
    env = {"EDGE_AGENT_MQTT_PORT": "1884", "EDGE_AGENT_AGENT_GROUPS": "barn, north", "EDGE_AGENT_MQTT_TLS_CA": "/ca.pem",
           "EDGE_AGENT_SAMPLING_PER_CPU": "yes"}
    cfg = config.parse(data, env)
    assert cfg.agent.device_id == "pi-7"
    assert cfg.agent.interval_s == 2.0
    assert cfg.mqtt.port == 1884
    assert cfg.agent.groups == ("barn", "north")
    assert cfg.mqtt.tls_ca == "/ca.pem"
    assert cfg.sampling.per_cpu is True


def test_config_is_frozen():
    cfg = config.parse({}, {})
    with pytest.raises(AttributeError):
        cfg.agent.interval_s = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, env, message",
    [
        ({"mqtt": {"port": "abc"}}, {}, r"mqtt\.port: expected an integer"),
        ({"mqtt": {"port": 70000}}, {}, r"mqtt\.port: must be <= 65535"),
        ({"mqtt": {"hots": "x"}}, {}, r"unknown key 'mqtt\.hots' \(did you mean 'mqtt\.host'\?\)"),
        ({"mqt": {}}, {}, r"unknown section 'mqt'"),
        ({"agent": {"interval_s": 0}}, {}, r"agent\.interval_s: must be >= 0\.01"),
        ({"agent": {"log_level": "LOUD"}}, {}, r"agent\.log_level: expected one of DEBUG"),
        ({"agent": {"device_id": "a/b"}}, {}, r"agent\.device_id: must not contain"),
        ({"agent": {"groups": "barn"}}, {}, r"agent\.groups: expected a list of strings"),
        ({"mqtt": {"tls_cert": "c.pem"}}, {}, r"tls_cert and mqtt\.tls_key"),
        ({}, {"EDGE_AGENT_MQTT_PORT": "eighty"}, r"EDGE_AGENT_MQTT_PORT.*expected an integer"),
        ({}, {"EDGE_AGENT_NOPE_X": "1"}, r"EDGE_AGENT_NOPE_X"),
        ({"agent": []}, {}, r"agent: expected a \[agent\] table"),
    ],
)
def test_bad_values_name_the_key(data, env, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(data, env)


def test_resolution_order(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[agent]\ndevice_id = "from-env-file"\n')
    assert config.load(None, {"EDGE_AGENT_CONFIG": str(f)}).device_id == "from-env-file"
    g = tmp_path / "b.toml"
    g.write_text('[agent]\ndevice_id = "from-cli"\n')
    assert config.load(str(g), {"EDGE_AGENT_CONFIG": str(f)}).device_id == "from-cli"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(str(tmp_path / "nope.toml"), {})
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(config.ConfigError, match="invalid TOML"):
        config.load(str(bad), {})


def test_cli_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "x"\n')
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--config", str(bad)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["edge-agent: configuration error: mqtt.port: expected an integer, got 'x'"]
    assert "Traceback" not in proc.stderr


def test_example_config_documents_every_key_and_parses():
    text = (REPO / "agent" / "agent.example.toml").read_text()
    data = tomllib.loads(text)
    config.parse(data, {})  # the example is a valid configuration as written
    for key, _kind, _default, _doc in config.reference():
        section, name = key.split(".", 1)
        assert re.search(rf"^\[{section}\]", text, re.M), f"section [{section}] missing from example"
        assert re.search(rf"^#?\s*{re.escape(name)}\s*=", text, re.M), f"{key} not documented in agent.example.toml"


def test_readme_reference_is_generated_from_the_code():
    readme = (REPO / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"
    section = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert section == config.reference_markdown(), "run: python -m agent.config and paste between the markers"
