"""The one config loader: precedence, historic names, validation, masking."""
from __future__ import annotations

from pathlib import Path

import pytest

from sorna_server.config import ConfigError, SornaConfig, load_config, mask_url


def test_defaults(tmp_path: Path) -> None:
    config = load_config()
    assert config.service_port == 0 and config.http_port == 8080
    assert config.manager_port == 5001 and config.events_port == 5002
    assert config.agent_port == 6001
    assert config.uses_embedded_db
    assert config.database_url == f"sqlite:///{tmp_path / 'sorna-data' / 'sorna.db'}"
    assert config.explicit_redis_url is None
    assert config.embedded_redis_socket == tmp_path / "sorna-data" / "redis.sock"


def test_precedence_defaults_file_env_flags(write_file, monkeypatch: pytest.MonkeyPatch) -> None:
    write_file("sorna.toml", 'service_port = 7001\nevents_port = 7002\nmanager_port = 7003\n')
    config = load_config()
    assert (config.service_port, config.events_port, config.manager_port) == (7001, 7002, 7003)
    assert config.agent_port == 6001                           # default survives

    monkeypatch.setenv("SORNA_EVENTS_PORT", "8002")
    monkeypatch.setenv("SORNA_MANAGER_PORT", "8003")
    config = load_config()
    assert (config.service_port, config.events_port, config.manager_port) == (7001, 8002, 8003)

    config = load_config(None, manager_port=9003, service_port=None)   # None = flag not given
    assert (config.service_port, config.events_port, config.manager_port) == (7001, 8002, 9003)


def test_config_file_from_flag_and_env(write_file, monkeypatch: pytest.MonkeyPatch) -> None:
    write_file("sorna.toml", "service_port = 1111\n")
    other = write_file("other.toml", "service_port = 2222\n")
    assert load_config().service_port == 1111
    assert load_config(other).service_port == 2222
    monkeypatch.setenv("SORNA_CONFIG", str(other))
    assert load_config().service_port == 2222


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.toml does not exist"):
        load_config(tmp_path / "nope.toml")


def test_historic_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "SORNA_DB_ADDR": "db.example:6432", "SORNA_DB_NAME": "billing",
        "SORNA_DB_USER": "sorna", "SORNA_DB_PASSWORD": "p@ss:word",
        "SORNA_REDIS_ADDR": "cache.example:6380", "SORNA_SERVICE_IP": "127.0.0.2",
        "SORNA_SERVICE_PORT": "0", "SORNA_MANAGER_PORT": "15001",
        "SORNA_EVENTS_PORT": "15002", "SORNA_AGENT_PORT": "16001", "SORNA_DEBUG": "true",
    }.items():
        monkeypatch.setenv(name, value)
    config = load_config()
    assert config.database_url == "postgresql://sorna:p%40ss%3Aword@db.example:6432/billing"
    assert not config.uses_embedded_db
    assert config.explicit_redis_url == "redis://cache.example:6380"
    assert config.service_ip == "127.0.0.2"
    assert config.http_port == 8080
    assert (config.manager_port, config.events_port, config.agent_port) == (15001, 15002, 16001)
    assert config.debug is True
    assert "p@ss:word" not in repr(config) and "p@ss:word" not in str(config)


def test_service_port_zero_means_8443_with_tls(write_file) -> None:
    cert, key = write_file("c.pem", "x"), write_file("k.pem", "x")
    assert load_config(None, ssl_cert=str(cert), ssl_key=str(key)).http_port == 8443
    with pytest.raises(ConfigError, match="ssl_cert/ssl_key: give both"):
        load_config(None, ssl_cert=str(cert))


def test_urls_win_over_historic_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SORNA_DB_ADDR", "old:5432")
    monkeypatch.setenv("SORNA_DB_URL", "postgresql://u:secret@new:5432/sorna")
    monkeypatch.setenv("SORNA_REDIS_ADDR", "old:6379")
    monkeypatch.setenv("SORNA_REDIS_URL", "redis://:secret@new:6379/0")
    config = load_config()
    assert config.database_url == "postgresql://u:secret@new:5432/sorna"
    assert config.explicit_redis_url == "redis://:secret@new:6379/0"
    assert "secret" not in repr(config)


def test_list_setting_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SORNA_AGENT_MANAGERS", "tcp://10.0.0.1:5002, tcp://10.0.0.2:5002")
    assert load_config().agent_managers == ["tcp://10.0.0.1:5002", "tcp://10.0.0.2:5002"]
    monkeypatch.setenv("SORNA_AGENT_MANAGERS", '["tcp://a:1"]')
    assert load_config().agent_managers == ["tcp://a:1"]


def test_sizes_accept_units() -> None:
    assert load_config(None, agent_max_mem="256m").agent_max_mem == 256 << 20
    with pytest.raises(ConfigError, match="invalid setting agent_max_mem"):
        load_config(None, agent_max_mem="lots")


@pytest.mark.parametrize(("source", "needle"), [
    ("env", "from environment SORNA_SERVICE_PORT"),
    ("file", "sorna.toml"),
    ("flag", "from the command line"),
])
def test_bad_value_names_setting_and_origin(source: str, needle: str, write_file,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    flags = {}
    if source == "env":
        monkeypatch.setenv("SORNA_SERVICE_PORT", "eighty")
    elif source == "file":
        write_file("sorna.toml", 'service_port = "eighty"\n')
    else:
        flags["service_port"] = "eighty"
    with pytest.raises(ConfigError) as caught:
        load_config(None, **flags)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("invalid setting service_port")
    assert needle in message and "'eighty'" in message


def test_unknown_and_unparsable_file(write_file) -> None:
    write_file("sorna.toml", "servce_port = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'servce_port'"):
        load_config()
    write_file("sorna.toml", "service_port = = 1\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config()


@pytest.mark.parametrize("url", ["mysql://root:hunter2@db/sorna", "hunter2", "postgresql://"])
def test_bad_database_url_never_echoes_it(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SORNA_DB_URL", url)
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert "invalid setting db_url (from environment SORNA_DB_URL)" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_bad_redis_url_and_password_are_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, redis_url="http://:hunter2@x")
    assert "invalid setting redis_url" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql://u:secret@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:se@cr@et@h/db", "postgresql://u:***@h/db"),
    ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
    ("postgresql://u@h/db?password=secret&sslmode=require",
     "postgresql://u@h/db?password=***&sslmode=require"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_settings_object_has_every_documented_historic_field() -> None:
    historic = {"db_addr", "db_name", "db_user", "db_password", "redis_addr", "service_ip",
                "service_port", "ssl_cert", "ssl_key", "manager_port", "events_port",
                "agent_port", "debug", "db_url", "redis_url", "data_dir"}
    assert historic <= set(SornaConfig.model_fields)


def test_empty_environment_value_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SORNA_DB_URL", "")
    monkeypatch.setenv("SORNA_SERVICE_PORT", "")
    config = load_config()
    assert config.uses_embedded_db and config.service_port == 0
