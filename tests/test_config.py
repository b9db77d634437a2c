"""Configuration: layering, legacy names, validation errors, masking."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from archive_worker.cli import app
from archive_worker.config import (
    FIELD_NAMES,
    LEGACY_ENV,
    Settings,
    env_name,
    load_settings,
)
from archive_worker.errors import ConfigError


class TestLayers:
    def test_defaults(self) -> None:
        """Without any source the documented defaults apply."""
        s = load_settings(environ={})
        assert s.queue_size == 32
        assert s.job_timeout_s == 3600
        assert s.nats_url is None
        assert s.zip_compression == "DEFLATED"

    def test_file_then_env_then_flags(self, tmp_path: Path) -> None:
        """A flag beats the environment, which beats the file."""
        cfg = tmp_path / "c.toml"
        cfg.write_text('queue_size = 5\njob_slots = 3\nlog_level = "DEBUG"\n')
        s = load_settings(
            config_file=cfg,
            environ={"ARCHIVE_WORKER_QUEUE_SIZE": "6", "ARCHIVE_WORKER_JOB_SLOTS": "4"},
            overrides={"job_slots": 7, "port": None},
        )
        assert (s.queue_size, s.job_slots, s.log_level, s.port) == (6, 7, "DEBUG", 8080)

    def test_config_file_from_environment(self, tmp_path: Path) -> None:
        """ARCHIVE_WORKER_CONFIG names the file when no flag does."""
        cfg = tmp_path / "c.toml"
        cfg.write_text("port = 9000\n")
        s = load_settings(environ={"ARCHIVE_WORKER_CONFIG": str(cfg)})
        assert s.port == 9000

    def test_nats_url_variable(self) -> None:
        """NATS_URL is read as the NATS tools read it."""
        s = load_settings(environ={"NATS_URL": "nats://a:4222,nats://b:4222"})
        assert s.nats_url == "nats://a:4222,nats://b:4222"

    @pytest.mark.parametrize("prefix", ["QUIZ_ARCHIVER_", "MOODLE_ARCHIVER_"])
    def test_legacy_names(self, prefix: str) -> None:
        """The existing workers' variables keep working."""
        env = {
            prefix + "QUEUE_SIZE": "9",
            prefix + "PARALLEL_JOBS": "3",
            prefix + "REQUEST_TIMEOUT_SEC": "1800",
            prefix + "SERVER_PORT": "8081",
            prefix + "PDFA_CONVERSION": "False",
            prefix + "ZIP_COMPRESSION_ALGO": "LZMA",
            prefix + "HISTORY_SIZE": "128",
        }
        s = load_settings(environ=env)
        assert (s.queue_size, s.job_slots, s.job_timeout_s, s.port) == (
            9,
            3,
            1800,
            8081,
        )
        assert s.pdfa_conversion is False
        assert s.zip_compression == "LZMA"

    def test_new_names_beat_legacy(self) -> None:
        """ARCHIVE_WORKER_* wins over QUIZ_ARCHIVER_* for the same option."""
        s = load_settings(
            environ={"QUIZ_ARCHIVER_QUEUE_SIZE": "9", "ARCHIVE_WORKER_QUEUE_SIZE": "4"}
        )
        assert s.queue_size == 4

    def test_every_legacy_name_maps_to_a_field(self) -> None:
        """No legacy variable points at an option that does not exist."""
        assert set(LEGACY_ENV.values()) <= set(FIELD_NAMES)

    def test_lists_from_environment(self) -> None:
        """Comma-separated values become lists."""
        s = load_settings(
            environ={
                "ARCHIVE_WORKER_MOODLE_ALLOWLIST": "https://a.example, https://b.example"
            }
        )
        assert s.moodle_allowlist == ["https://a.example", "https://b.example"]


class TestValidation:
    @pytest.mark.parametrize(
        ("env", "key", "value"),
        [
            ({"ARCHIVE_WORKER_QUEUE_SIZE": "many"}, "queue_size", "many"),
            ({"ARCHIVE_WORKER_QUEUE_SIZE": "0"}, "queue_size", 0),
            (
                {"QUIZ_ARCHIVER_PDFA_CONVERSION": "tru"},
                "QUIZ_ARCHIVER_PDFA_CONVERSION",
                "tru",
            ),
            ({"ARCHIVE_WORKER_ZIP_COMPRESSION": "ZSTD"}, "zip_compression", "ZSTD"),
            ({"ARCHIVE_WORKER_PORT": "70000"}, "port", 70000),
            ({"ARCHIVE_WORKER_STREAM_REPLICAS": "2"}, "stream_replicas", 2),
            ({"ARCHIVE_WORKER_LOG_LEVEL": "LOUD"}, "log_level", "LOUD"),
            ({"ARCHIVE_WORKER_PAGE_MARGIN": "wide"}, "page_margin", "wide"),
            (
                {"ARCHIVE_WORKER_MOODLE_ALLOWLIST": "moodle.example"},
                "moodle_allowlist",
                "moodle.example",
            ),
        ],
    )
    def test_error_names_key_and_value(
        self, env: dict[str, str], key: str, value: object
    ) -> None:
        """A bad value fails at start with the key and the value in the message."""
        with pytest.raises(ConfigError) as info:
            load_settings(environ=env)
        assert info.value.key == key
        assert info.value.value == value
        assert key in str(info.value)

    def test_unknown_key_in_file(self, tmp_path: Path) -> None:
        """A misspelt key in the file is an error, not silently ignored."""
        cfg = tmp_path / "c.toml"
        cfg.write_text("queue_sise = 5\n")
        with pytest.raises(ConfigError, match="queue_sise"):
            load_settings(config_file=cfg, environ={})

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A missing or broken file says which file."""
        with pytest.raises(ConfigError, match="cannot read"):
            load_settings(config_file=tmp_path / "nope.toml", environ={})
        broken = tmp_path / "broken.toml"
        broken.write_text("queue_size = [")
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_settings(config_file=broken, environ={})

    def test_secret_value_masked_in_error(self) -> None:
        """A bad secret value is not echoed back."""
        with pytest.raises(ConfigError) as info:
            load_settings(environ={"ARCHIVE_WORKER_PATH_PREFIX": "a/b"})
        assert "a/b" not in str(info.value)


class TestMasking:
    def test_secrets_masked(self) -> None:
        """masked() hides passwords, tokens and the secret path."""
        s = Settings(nats_password="pw", nats_token="tk", path_prefix="hidden")
        data = s.masked()
        assert (
            data["nats_password"] == data["nats_token"] == data["path_prefix"] == "***"
        )
        assert "pw" not in str(data)

    def test_config_command(self) -> None:
        """`archive-worker config` prints every option with secrets masked."""
        runner = CliRunner()
        result = runner.invoke(
            app,
            ["config", "--json"],
            env={
                "ARCHIVE_WORKER_NATS_PASSWORD": "hunter2",
                "QUIZ_ARCHIVER_QUEUE_SIZE": "3",
            },
        )
        assert result.exit_code == 0, result.output
        assert "hunter2" not in result.output
        import json

        data = json.loads(result.output)
        assert data["nats_password"] == "***"
        assert data["queue_size"] == 3
        assert set(data) == set(FIELD_NAMES)

    def test_config_command_reports_bad_value(self) -> None:
        """A bad value makes the command exit 2 with the key named."""
        result = CliRunner().invoke(
            app, ["config"], env={"ARCHIVE_WORKER_JOB_SLOTS": "-1"}
        )
        assert result.exit_code == 2
        assert "job_slots" in result.output


def test_env_name() -> None:
    """Field names map to upper-case ARCHIVE_WORKER_ variables."""
    assert env_name("queue_size") == "ARCHIVE_WORKER_QUEUE_SIZE"
