"""Fault tolerance of ``fit``: SIGKILL and resume, seeded determinism, atomic checkpoints, pickles refused.

The kill tests run training in a child process (``python -m tests.test_faults ...``, the ``__main__`` block at the
end), kill it with SIGKILL at a chosen point after a checkpoint exists, run it again in a fresh process and
compare the final weights and metrics with an uninterrupted run, exactly (CPU, deterministic mode, one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import medtl.train.checkpoint as checkpoint
from medtl.config import AugmentConfig, TrainConfig
from medtl.data.datasets import SampleDataset, make_loader
from medtl.data.transforms import ssl_views_transform, train_transform
from medtl.models.weights import UnsafeCheckpointError, read_state_dict
from medtl.ssl import build_ssl_objective
from medtl.train import Supervised, fit
from medtl.train.checkpoint import (CheckpointError, atomic_save_tensors, load_checkpoint, load_tensors,
                                    read_header)
from medtl.train.core import CHECKPOINT_NAME
from tests.conftest import TinyNet

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4
STEPS_PER_EPOCH = 4  # 32 images, batches of 8
CHILD_TIMEOUT_S = 120


def _write_records(folder: Path) -> list[dict]:
    """32 tiny 16x16 images as .npy (label 1: a bright square), the same bytes in every process."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(32):
        img = rng.normal(0.4, 0.05, (1, 16, 16)).astype(np.float32)
        if i % 2:
            img[:, 5:11, 5:11] += 0.4
        path = folder / f"img{i:02d}.npy"
        if not path.exists():
            np.save(path, np.clip(img, 0, 1))
        records.append({"image": str(path), "label": i % 2, "hospital": "h", "patient_id": f"p{i}"})
    return records


def _train(kind: str, data: Path, run: Path | None) -> tuple[torch.nn.Module, object]:
    """The run the kill tests interrupt: ``finetune`` (supervised, random augmentation, BatchNorm) or
    ``pretrain`` (MoCo v2: projection head, momentum encoder and a queue of keys, all in the checkpoint)."""
    records = _write_records(data)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=8, lr=3e-3, device="cpu", progress=False, seed=5,
                      checkpoint_every=1, deterministic=True)
    torch.manual_seed(0)
    model = TinyNet()
    if kind == "finetune":
        transform = train_transform(2, 16, (0.5,), (0.25,), AugmentConfig())
        objective = Supervised()
    else:
        transform = ssl_views_transform(2, 16, (0.5,), (0.25,), AugmentConfig())
        objective = build_ssl_objective("moco", model, projection_dim=8, total_steps=EPOCHS * STEPS_PER_EPOCH)
    loader = make_loader(SampleDataset(records, transform), 8, shuffle=True, drop_last=True)
    assert len(loader) == STEPS_PER_EPOCH
    result = fit(model, objective, loader, cfg, checkpoint_dir=None if run is None else run / "checkpoints",
                 description=kind)
    return model, result


def _child_main(argv: list[str]) -> None:
    """``python -m tests.test_faults KIND DATA RUN [--hang-at-step N | --hang-in-save N]``: train, and write
    ``RUN/final.safetensors`` and ``RUN/result.json``. With a hang option the child writes ``RUN/hanging`` at
    that point and sleeps there until the test kills it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["finetune", "pretrain"])
    parser.add_argument("data", type=Path)
    parser.add_argument("run", type=Path)
    parser.add_argument("--hang-at-step", type=int, default=None, help="1-based training step (forward pass)")
    parser.add_argument("--hang-in-save", type=int, default=None, help="1-based checkpoint write, before rename")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    marker = args.run / "hanging"

    def hang() -> None:
        marker.write_text(str(os.getpid()))
        time.sleep(CHILD_TIMEOUT_S * 2)  # killed long before this ends
        raise SystemExit("the test never killed this child")

    if args.hang_at_step is not None:
        from medtl.train.objectives import Objective

        calls = [0]
        forward = Objective.__call__

        def counting_call(self, *a, **kw):
            calls[0] += 1
            if calls[0] == args.hang_at_step:
                hang()
            return forward(self, *a, **kw)

        Objective.__call__ = counting_call  # the class, not the instance: state_dict keys stay the same
    if args.hang_in_save is not None:
        import medtl.workspace as workspace

        writes = [0]
        fsync = workspace._fsync  # what atomic_write calls once the temporary file is complete

        def hanging_fsync(path):
            fsync(path)
            # the new checkpoint is complete under its temporary name
            if Path(path).name.startswith(f".{CHECKPOINT_NAME}.") and str(path).endswith(".tmp"):
                writes[0] += 1
                if writes[0] == args.hang_in_save:
                    hang()

        workspace._fsync = hanging_fsync
    model, result = _train(args.kind, args.data, args.run)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.run / "final.safetensors"))
    (args.run / "result.json").write_text(json.dumps({"history": result.history,
                                                      "resumed_from_epoch": result.resumed_from_epoch}))


def _child(kind: str, data: Path, run: Path, *hang: str) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "tests.test_faults", kind, str(data), str(run), *hang],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when_hanging(process: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not (run / "hanging").exists():
        if process.poll() is not None:
            pytest.fail(f"the child ended (status {process.returncode}) before the kill point:\n"
                        f"{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the child did not reach the kill point within {CHILD_TIMEOUT_S} s")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    process.stdout.close()


@pytest.mark.parametrize(("kind", "hang", "resumed_from"), [
    ("pretrain", ("--hang-at-step", str(2 * STEPS_PER_EPOCH + 2)), 1),  # mid-epoch 3: checkpoint of epoch 2
    ("finetune", ("--hang-in-save", "3"), 1),  # writing epoch 3's checkpoint: epoch 2's is the last whole one
])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(kind: str, hang: tuple[str, str], resumed_from: int,
                                                        tmp_path: Path) -> None:
    data = tmp_path / "data"
    reference, reference_result = _train(kind, data, tmp_path / "uninterrupted")

    run = tmp_path / "killed"
    _kill_when_hanging(_child(kind, data, run, *hang), run)
    ckpt = run / "checkpoints" / CHECKPOINT_NAME
    assert read_header(ckpt)["epoch"] == resumed_from  # the last whole checkpoint survived the kill
    if kind == "finetune":
        assert list(ckpt.parent.glob("*.tmp"))  # the killed write's temporary file is still there

    resumed = _child(kind, data, run)
    output, _ = resumed.communicate(timeout=CHILD_TIMEOUT_S)
    assert resumed.returncode == 0, output
    result = json.loads((run / "result.json").read_text())
    assert result["resumed_from_epoch"] == resumed_from
    assert result["history"] == reference_result.history  # every metric of every epoch, exactly
    final = load_file(str(run / "final.safetensors"))
    expected = reference.state_dict()
    assert final.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(final[key], tensor), key
    assert not list(ckpt.parent.glob("*.tmp"))  # the resumed run cleared the killed write's leftover


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_two_seeded_runs_give_identical_metrics_and_weights(kind: str, tmp_path: Path) -> None:
    first, first_result = _train(kind, tmp_path / "data", None)
    second, second_result = _train(kind, tmp_path / "data", None)
    assert len(first_result.history) == EPOCHS
    assert first_result.history == second_result.history
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / CHECKPOINT_NAME
    atomic_save_tensors({"w": torch.ones(3)}, path, {"epoch": "1"})

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # what a crash half-way through the write leaves
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_tensors({"w": torch.zeros(3)}, path, {"epoch": "2"})
    torch.testing.assert_close(load_tensors(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


class _SideEffect:
    """Unpickling this creates the folder ``marker``: the arbitrary code a malicious pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def _malicious(path: Path, marker: Path, how: str) -> Path:
    payload = {"model::w": torch.ones(2), "payload": _SideEffect(marker)}
    if how == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:  # torch.save's zip archive
        torch.save(payload, path)
    return path


@pytest.mark.parametrize("how", ["raw_pickle", "torch_save"])
def test_pickle_at_the_checkpoint_path_is_refused_and_never_run(how: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = _malicious(tmp_path / CHECKPOINT_NAME, marker, how)
    before = ckpt.read_bytes()
    loader = make_loader(SampleDataset(_write_records(tmp_path / "data"),
                                       train_transform(2, 16, (0.5,), (0.25,), AugmentConfig())), 8, shuffle=True)
    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", progress=False)
    with pytest.raises(CheckpointError) as refusal:
        fit(TinyNet(), Supervised(), loader, cfg, checkpoint_dir=tmp_path)
    message = str(refusal.value)
    assert str(ckpt) in message and "never unpickles" in message and "delete or move it" in message
    assert ckpt.read_bytes() == before  # neither loaded nor silently replaced
    model, objective = TinyNet(), Supervised()
    optimizer = torch.optim.AdamW(model.parameters())
    for load in (lambda: load_checkpoint(ckpt, model=model, objective=objective, optimizer=optimizer, scheduler=None),
                 lambda: read_header(ckpt), lambda: load_tensors(ckpt)):
        with pytest.raises(CheckpointError, match="never unpickles"):
            load()
    assert not marker.exists()


def test_a_safetensors_file_that_starts_like_a_pickle_still_loads(tmp_path: Path) -> None:
    """A header length whose low byte is 0x80 (pickle's first byte) is a valid safetensors file: one in 256
    files written by the stages is one. Found as a flaky test when a first-bytes check decided instead of the
    parser."""
    path = tmp_path / "model.safetensors"
    for padding in range(64):
        save_file({"w": torch.ones(2)}, str(path), metadata={"note": "x" * padding})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    torch.testing.assert_close(load_tensors(path)["w"], torch.ones(2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_every_weight_reader_refuses_a_malicious_pickle(suffix: str, tmp_path: Path) -> None:
    """``read_state_dict`` (backbone weights, ``file:`` backbones) and safetensors' ``load_file`` (the stages'
    saved models) on a pickle with a side effect: refused, and the side effect never happens."""
    marker = tmp_path / "pwned"
    path = _malicious(tmp_path / f"weights{suffix}", marker, "torch_save")
    if suffix == ".safetensors":
        with pytest.raises(SafetensorError):  # safetensors parses its own header only; a pickle fails that
            load_file(str(path))
        with pytest.raises(SafetensorError):
            read_state_dict(path)
        with pytest.raises(CheckpointError, match=str(path)):
            load_tensors(path)
    else:
        with pytest.raises(UnsafeCheckpointError, match="refused"):
            read_state_dict(path)
    assert not marker.exists()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
