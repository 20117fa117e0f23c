import subprocess
import sys
from pathlib import Path

import pytest

from medtl.cli import main
from medtl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "shortcut.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(ROOT / "configs" / name)
    assert config.data.target_hospital not in config.data.source_hospitals


def test_unknown_key_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  freeze_grups: 2\n")
    with pytest.raises(ConfigError, match="freeze_grups"):
        load_config(bad)


def test_missing_config_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_target_cannot_be_a_source(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  source_hospitals: [a]\n  target_hospital: a\n")
    with pytest.raises(ConfigError, match="also a source"):
        load_config(bad)


@pytest.mark.parametrize("text, message", [
    ("pretrain:\n  method: byol\n  temperature: 0.1\n", "byol has no softmax temperature"),
    ("pretrain:\n  method: vicreg\n  temperature: 0.1\n", "vicreg has no softmax temperature")])
def test_settings_a_method_ignores_are_refused(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(bad)
    bad.write_text(text.replace("byol", "moco").replace("vicreg", "simclr"))
    assert load_config(bad).pretrain.temperature == 0.1


def test_cli_bad_config_exits_2(tmp_path, capsys):
    assert main(["synth", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_synth_writes_dicom(tmp_path, capsys):
    assert main(["synth", "--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir", str(tmp_path)]) == 0
    assert len(list((tmp_path / "dicom").rglob("*.dcm"))) > 100
    assert "finished" in capsys.readouterr().out


def test_cli_ingest_as_a_user_runs_it(tmp_path) -> None:
    # The console script's __main__ imports torch: sandboxed workers must start without it, within their budget.
    medtl = Path(sys.executable).with_name("medtl")
    for command in ("synth", "ingest"):
        run = subprocess.run([str(medtl), command, "--config", str(ROOT / "configs" / "tiny.yaml"),
                              "--workdir", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert "files in 124 = ingested 120 + quarantined 3 + duplicates 1 (already done 0)" in run.stdout
