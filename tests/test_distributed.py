"""DDP through the one ``fit``: two gloo processes on the CPU train what one process trains.

The two ranks are spawned with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1 and a
free port) and start their process group with :func:`medtl.train.distributed.init_distributed`, as the torchrun
entry point does. The model is a small MLP without BatchNorm, so each rank's half of a batch gives exactly the
gradient share of the full batch and the runs agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from medtl import stages
from medtl.config import TrainConfig, load_config
from medtl.train import Supervised, fit
from medtl.train.core import CHECKPOINT_NAME
from medtl.train.checkpoint import read_header
from medtl.train.distributed import DistributedContext, ShardedBatchSampler, current_context, main, shard_loader
from medtl.workspace import Workspace
from tests.orthanc import free_port

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
EPOCHS = 4
SPAWN_TIMEOUT_S = 120


class _Mlp(nn.Module):
    """The backbone interface (embed / classify) as a two-layer MLP without BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.classifier = nn.Linear(16, 3)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(x))


class _Points(Dataset):
    """48 fixed points in 3 classes, as ``{"image", "label"}`` samples."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.y = torch.arange(48) % 3
        self.x = torch.randn(48, 6, generator=g) + nn.functional.one_hot(self.y, 6).float() * 2

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


class _Crash(Exception):
    """A rank dying after an epoch (before its checkpoint), on every rank alike."""


def _crash_at(epoch_index: int):
    def callback(epoch: int, model: nn.Module, logs: dict) -> None:
        if epoch == epoch_index:
            raise _Crash

    return callback


def _unfreeze_body_after_first_epoch(epoch: int, model: nn.Module, logs: dict) -> None:
    if epoch == 0:
        for p in model.body.parameters():
            p.requires_grad_(True)


def _cfg() -> TrainConfig:
    return TrainConfig(epochs=EPOCHS, batch_size=8, lr=0.05, optimizer="adamw", device="cpu", progress=False,
                       seed=3, grad_clip_norm=0.5)


def _loader() -> DataLoader:
    return DataLoader(_Points(), batch_size=8, shuffle=True)  # the global batch: each rank gets 4 of these 8


def _plain_run(checkpoint_dir: Path, crash_first: bool) -> tuple[nn.Module, object]:
    """Four epochs with a checkpoint every epoch; ``crash_first``: a first call dies in epoch 3, a second resumes."""
    if crash_first:
        torch.manual_seed(0)
        with pytest.raises(_Crash):
            fit(_Mlp(), Supervised(), _loader(), _cfg(), checkpoint_dir=checkpoint_dir, callbacks=[_crash_at(2)])
    torch.manual_seed(0)
    model = _Mlp()
    result = fit(model, Supervised(), _loader(), _cfg(), checkpoint_dir=checkpoint_dir)
    return model, result


def _unfreezing_run() -> tuple[nn.Module, object]:
    """The body frozen for the first epoch, then trained: the set of synchronised parameters changes."""
    torch.manual_seed(0)
    model = _Mlp()
    for p in model.body.parameters():
        p.requires_grad_(False)
    result = fit(model, Supervised(), _loader(), _cfg(), param_groups=[{"params": list(model.parameters())}],
                 callbacks=[_unfreeze_body_after_first_epoch])
    return model, result


def _save(out: Path, name: str, model: nn.Module, result) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{name}.safetensors"))
    (out / f"{name}.json").write_text(json.dumps({"history": result.history,
                                                  "resumed_from_epoch": result.resumed_from_epoch,
                                                  "device": result.device}))


def _worker(rank: int, port: int, out: str) -> None:
    """One rank, started as torchrun would start it."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import medtl.train.core as core
    from medtl.train.distributed import init_distributed

    out_dir = Path(out)
    saves: list[int] = []
    original_save = core.save_checkpoint

    def recording_save(path, **kwargs):
        saves.append(int(kwargs["epoch"]))
        original_save(path, **kwargs)

    core.save_checkpoint = recording_save
    ctx = init_distributed()
    assert ctx is not None and ctx.rank == rank and ctx.world_size == WORLD
    try:
        model, result = _plain_run(out_dir / "checkpoints", crash_first=True)
        _save(out_dir, f"plain_rank{rank}", model, result)
        model, result = _unfreezing_run()
        _save(out_dir, f"unfreeze_rank{rank}", model, result)
        (out_dir / f"saves_rank{rank}.json").write_text(json.dumps(saves))
    finally:
        torch.distributed.destroy_process_group()


def _spawn(out: Path) -> None:
    context = mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} DDP ranks did not finish within {SPAWN_TIMEOUT_S} s (a collective hung)")


def _assert_same_training(out: Path, name: str, reference: nn.Module, reference_result) -> None:
    ranks = [load_file(str(out / f"{name}_rank{r}.safetensors")) for r in range(WORLD)]
    for key, expected in reference.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}: ranks diverged on {key}"
        torch.testing.assert_close(ranks[0][key], expected, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    for r in range(WORLD):
        history = json.loads((out / f"{name}_rank{r}.json").read_text())["history"]
        assert [h["epoch"] for h in history] == [h["epoch"] for h in reference_result.history]
        for got, want in zip(history, reference_result.history):
            assert got.keys() == want.keys()
            for key in ("loss", "acc", "lr"):  # averaged over the ranks: the one-process epoch means
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (name, r, key)


def test_two_gloo_ranks_train_what_one_process_trains(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    _spawn(out)

    reference, reference_result = _plain_run(tmp_path / "single", crash_first=False)
    _assert_same_training(out, "plain", reference, reference_result)
    for r in range(WORLD):
        info = json.loads((out / f"plain_rank{r}.json").read_text())
        assert info["resumed_from_epoch"] == 1  # the crash in epoch 3 left the checkpoint of epoch 2
        assert info["device"] == "cpu"
    # rank 0 wrote every checkpoint (epochs 1-2 before the crash, 3-4 after resuming); rank 1 none
    assert json.loads((out / "saves_rank0.json").read_text()) == [0, 1, 2, 3]
    assert json.loads((out / "saves_rank1.json").read_text()) == []
    assert (out / "checkpoints" / CHECKPOINT_NAME).is_file()

    reference, reference_result = _unfreezing_run()
    _assert_same_training(out, "unfreeze", reference, reference_result)
    body = load_file(str(out / "unfreeze_rank0.safetensors"))["body.0.weight"]
    torch.manual_seed(0)
    assert not torch.equal(body, _Mlp().body[0].weight.detach())  # the body did train after being unfrozen


def test_batches_are_split_across_ranks_in_single_process_order() -> None:
    base = BatchSampler(SequentialSampler(range(10)), batch_size=4, drop_last=False)  # [0-3], [4-7], [8, 9]
    shards = [list(ShardedBatchSampler(base, r, 3, split_batches=True)) for r in range(3)]
    assert shards[0] == [[0, 3], [4, 7], [8]]
    assert shards[1] == [[1], [5], [9]]
    assert shards[2] == [[2], [6], [8]]  # a batch smaller than the world repeats its items: no empty batch
    assert all(len(ShardedBatchSampler(base, r, 3, split_batches=True)) == 3 for r in range(3))
    for i, batch in enumerate(base):
        assert sorted({x for shard in shards for x in shard[i]}) == batch


def test_episodes_are_dealt_whole_and_evenly() -> None:
    episodes = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]

    class Episodes:
        epochs: list[int] = []

        def __iter__(self):
            return iter(episodes)

        def __len__(self) -> int:
            return len(episodes)

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

    sampler = Episodes()
    shards = [ShardedBatchSampler(sampler, r, 2, split_batches=False) for r in range(2)]
    assert [list(s) for s in shards] == [[[0, 1], [4, 5], [8, 9]], [[2, 3], [6, 7], [0, 1]]]
    assert [len(s) for s in shards] == [3, 3]  # every rank takes the same number of steps
    shards[0].set_epoch(4)
    assert sampler.epochs == [4]


def test_shard_loader_keeps_the_dataset_and_refuses_unshardable_iterables() -> None:
    ctx = DistributedContext(rank=1, world_size=2, local_rank=1)
    loader = DataLoader(_Points(), batch_size=8, shuffle=False)
    sharded = shard_loader(loader, ctx)
    assert sharded.dataset is loader.dataset and len(sharded) == len(loader)
    first = next(iter(sharded))
    torch.testing.assert_close(first["image"], loader.dataset.x[1:8:2])
    with pytest.raises(ValueError, match="DataLoader"):
        shard_loader([{"image": torch.zeros(2, 6)}], ctx)
    with pytest.raises(ValueError, match="rank must be"):
        ShardedBatchSampler(loader.batch_sampler, 2, 2, split_batches=True)


def test_torchrun_environment_without_a_process_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="medtl.train.distributed"):
        current_context()
    with pytest.raises(RuntimeError, match="not initialised"):
        fit(_Mlp(), Supervised(), _loader(), _cfg())


def test_entry_point_runs_only_training_stages(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["ingest", "--config", "configs/tiny.yaml"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'ingest'" in capsys.readouterr().err


_STAGE_CONFIG = """
synth:
  labeled_per_hospital: 12
  unlabeled_per_hospital: 4
  broken_files: 0
  workers: 1
  hospitals:
    - {name: a, manufacturer: GE Healthcare, model_name: Definium 8000, institution: Hospital A,
       rows: 48, columns: 48, pixel_spacing_mm: 5.6, photometric: MONOCHROME2, prevalence: 0.5}
    - {name: b, manufacturer: SIEMENS, model_name: Ysio Max, institution: Hospital B,
       rows: 48, columns: 48, pixel_spacing_mm: 5.6, photometric: MONOCHROME2, prevalence: 0.5}
ingest: {image_size: 16, workers: 1}
data: {source_hospitals: [Hospital A], target_hospital: Hospital B, image_size: 16}
pretrain:
  init: null
  train: {epochs: 2, batch_size: 8, progress: false, device: cpu}
"""


@pytest.mark.slow
def test_pretrain_stage_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented command: ``torchrun ... -m medtl.train.distributed pretrain`` on two CPU ranks. Its
    checkpoint is the one a single process writes: a one-process re-run finds the run finished and exports the
    same weights."""
    monkeypatch.setenv("MEDTL_CACHE", str(tmp_path / "cache"))
    config_path = tmp_path / "stage.yaml"
    config_path.write_text(f"workdir: {tmp_path / 'run'}\n{_STAGE_CONFIG}")
    config = load_config(config_path)
    ws = Workspace(config.workdir)
    stages.run_synth(config.synth, ws)
    stages.run_ingest(config.ingest, ws)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    launch = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
         "-m", "medtl.train.distributed", "pretrain", "--config", str(config_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert launch.returncode == 0, launch.stdout + launch.stderr
    assert launch.stdout.count("medtl pretrain finished") == 1  # only rank 0 prints the summary

    card = json.loads((ws.weights / "efficientnet_lite0.ssl.json").read_text())
    assert [h["epoch"] for h in card["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in card["history"])
    assert read_header(ws.pretrain / "checkpoints" / CHECKPOINT_NAME)["epoch"] == 1
    distributed = load_file(str(ws.weights / "efficientnet_lite0.ssl.safetensors"))

    again = stages.run_pretrain(config.pretrain, config.data, ws)  # one process: resumes, nothing left to train
    assert again["final_loss"] == card["history"][-1]["loss"]
    single = load_file(str(ws.weights / "efficientnet_lite0.ssl.safetensors"))
    assert single.keys() == distributed.keys()
    assert all(torch.equal(single[k], distributed[k]) for k in single)
