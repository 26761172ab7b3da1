"""The deployment kit (deploy/) cannot rot silently: every setting and SORNA_* name it
uses exists, the example configs load, the commands parse, the units verify.

Docker cannot run here (no engine in the test machines), so the Dockerfile and the
compose file are checked statically: paths, commands, ports, environment names.
"""
from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from sorna_cli.main import cli
from sorna_server.config import SornaConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS = set(SornaConfig.model_fields)
ENV_NAME = re.compile(r"\bSORNA_[A-Z0-9_]+\b")
# Names that are not settings but are meant: the config file path.
NOT_SETTINGS = {"SORNA_CONFIG"}


def deploy_files() -> list[Path]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    assert len(files) >= 6, files
    return files


def test_every_sorna_environment_name_is_a_setting() -> None:
    used: dict[str, set[str]] = {}
    for path in deploy_files() + [ROOT / "docs" / "deployment.md"]:
        for name in ENV_NAME.findall(path.read_text()):
            used.setdefault(name, set()).add(path.name)
    unknown = {name: files for name, files in used.items()
               if name not in NOT_SETTINGS and name.removeprefix("SORNA_").lower() not in SETTINGS}
    assert not unknown, f"not settings of SornaConfig: {unknown}"
    assert "SORNA_DB_URL" in used and "SORNA_REDIS_URL" in used


@pytest.mark.parametrize("name", ["sorna-gateway.toml", "sorna-agent.toml"])
def test_example_configs_load(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = DEPLOY / name
    config = load_config(path)   # unknown keys and bad values fail here
    keys = {line.split("=", 1)[0].strip() for line in path.read_text().splitlines()
            if re.match(r"^[a-z_]+\s*=", line)}
    assert keys and keys <= SETTINGS
    if name == "sorna-gateway.toml":
        assert config.log_format == "json" and config.metrics_addr
    else:
        assert config.agent_managers and config.agent_advertise_host


def _units() -> list[Path]:
    return sorted((DEPLOY / "systemd").glob("*.service"))


def _unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def test_units_run_sorna_with_their_config_and_a_sandbox() -> None:
    units = {path.name: _unit(path) for path in _units()}
    assert set(units) == {"sorna-gateway.service", "sorna-agent.service"}
    gateway, agent = units["sorna-gateway.service"], units["sorna-agent.service"]
    assert gateway["Service"]["ExecStart"].endswith("sorna serve")
    assert agent["Service"]["ExecStart"].endswith("sorna agent")
    text = (DEPLOY / "systemd" / "sorna-gateway.service").read_text()
    for option in ("ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                   "RestrictNamespaces=yes", "SystemCallFilter=@system-service", "User=sorna"):
        assert option in text, option
    text = (DEPLOY / "systemd" / "sorna-agent.service").read_text()
    # what the agent needs as root: namespaces, cgroups, mounts, setuid
    assert "Delegate=yes" in text and "User=root" in text and "KillMode=mixed" in text
    for forbidden in ("RestrictNamespaces=yes", "ProtectControlGroups=yes", "PrivateUsers=yes",
                      "PrivateDevices=yes", "SystemCallFilter="):
        assert forbidden not in text.replace("# ", "#"), forbidden
    for capability in ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_NET_ADMIN", "CAP_KILL"):
        assert capability in text
    for option in ("ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                   "ProtectKernelModules=yes", "RestrictSUIDSGID=yes"):
        assert option in text, option


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify_with_systemd_analyze(tmp_path: Path) -> None:
    sorna = Path(sys.executable).with_name("sorna")
    assert sorna.exists()
    for path in _units():
        copy = tmp_path / path.name  # with the ExecStart of this machine's installation
        copy.write_text(path.read_text().replace("/opt/sorna/bin/sorna", str(sorna)))
        result = subprocess.run(["systemd-analyze", "verify", str(copy)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def _command_flags(command: click.Command) -> set[str]:
    flags: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            flags.update(param.opts)
    return flags


def _check_sorna_args(args: list[str]) -> None:
    """ARGS parse as a `sorna` command line: known command, known flags."""
    root_flags = _command_flags(cli)
    command: click.Command = cli
    for word in args:
        if word.startswith("--"):
            assert word in _command_flags(command) | root_flags, (args, word)
        elif isinstance(command, click.Group):
            sub = command.get_command(click.Context(command), word)
            assert sub is not None, (args, word)
            command = sub


def test_compose_runs_postgres_redis_a_gateway_and_an_agent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "gateway", "agent"} <= set(services)
    for name, service in services.items():
        if service.get("image") != "sorna:latest":
            continue
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        _check_sorna_args(service["command"])
        for key in service.get("environment", {}):
            assert key.removeprefix("SORNA_").lower() in SETTINGS, (name, key)
    assert services["agent"]["privileged"] is True and services["agent"]["user"] == "root"
    assert services["gateway"]["command"][0] == "serve"
    manager = services["agent"]["command"][services["agent"]["command"].index("--manager") + 1]
    assert manager == f"tcp://gateway:{services['gateway']['environment']['SORNA_EVENTS_PORT']}"
    assert "schema" in services["gateway"]["depends_on"]
    # CurveZMQ: the keys service makes both keypairs; each side names its own secret
    # key and the other side's public key, on the shared keys volume
    assert services["keys"]["command"][:2] == ["keys", "generate"]
    assert "keys" in services["gateway"]["depends_on"]
    made = {arg for arg in services["keys"]["command"] if arg.startswith("/")}
    gateway_env, agent_env = (services[name]["environment"] for name in ("gateway", "agent"))
    assert gateway_env["SORNA_GATEWAY_KEY"].removesuffix(".key_secret") in made
    assert gateway_env["SORNA_AGENT_KEYS"].removesuffix(".key") in made
    assert agent_env["SORNA_AGENT_KEY"].removesuffix(".key_secret") in made
    assert agent_env["SORNA_GATEWAY_KEYS"].removesuffix(".key") in made


def test_dockerfile_copies_what_exists_and_runs_sorna() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.MULTILINE):
        assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["tini", "--", "sorna"]' in text and 'CMD ["serve"]' in text
    assert "/healthz" in text and "USER sorna" in text
    exposed = {int(port) for port in re.search(r"^EXPOSE (.+)$", text, re.MULTILINE)
               .group(1).split()}
    defaults = SornaConfig.model_fields
    assert {8080, defaults["events_port"].default, defaults["agent_port"].default} == exposed
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for package in ("sorna_server", "sorna_agent", "sorna_cli", "fixtures", "migrations"):
        assert f"!{package}/**" in ignore
