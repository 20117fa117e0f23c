"""Starting the pipeline under Prefect's ephemeral server on a busy machine: a startup timeout from medtl's
settings instead of Prefect's 20 s, and a message that names what to change when it still times out."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

from flows import pipeline as pipeline_module
from medtl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_pipeline_waits_as_long_as_the_config_says(monkeypatch) -> None:
    monkeypatch.delenv(pipeline_module.STARTUP_TIMEOUT_VARIABLE, raising=False)
    config = load_config(ROOT / "configs" / "tiny.yaml", {"orchestration": {"ephemeral_startup_timeout_s": 240}})
    assert config.orchestration.ephemeral_startup_timeout_s > 20  # Prefect's default is what failed on a busy node
    with pipeline_module.prefect_settings(config):
        assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == 240
    assert load_config(ROOT / "configs" / "tiny.yaml").orchestration.ephemeral_startup_timeout_s == 180


def test_the_environment_variable_wins(monkeypatch) -> None:
    monkeypatch.setenv(pipeline_module.STARTUP_TIMEOUT_VARIABLE, "33")
    config = load_config(ROOT / "configs" / "tiny.yaml")
    with pipeline_module.prefect_settings(config):
        assert pipeline_module.prefect_startup_timeout() != config.orchestration.ephemeral_startup_timeout_s


def test_a_startup_timeout_ends_with_a_message_naming_the_settings(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.delenv(pipeline_module.STARTUP_TIMEOUT_VARIABLE, raising=False)
    seen = {}

    def busy_machine(config):
        seen["timeout"] = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(pipeline_module, "pipeline", busy_machine)
    code = pipeline_module.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and seen["timeout"] == 180
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in err and "orchestration.ephemeral_startup_timeout_s" \
        in err and "(180 s)" in err


def test_other_runtime_errors_are_not_disguised(monkeypatch, tmp_path) -> None:
    def broken(config):
        raise RuntimeError("something else")

    monkeypatch.setattr(pipeline_module, "pipeline", broken)
    with pytest.raises(RuntimeError, match="something else"):
        pipeline_module.main(["--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir", str(tmp_path)])
