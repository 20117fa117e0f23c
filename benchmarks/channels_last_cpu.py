"""Memory layout on the CPU, side by side in one run: the same steps in contiguous (NCHW) and channels_last (NHWC).

``medtl.train.fit`` and ``medtl.train.inference`` run 2-D nets channels_last on the CPU as well as on CUDA
(:func:`medtl.train.core.use_channels_last`), because oneDNN's convolutions are faster in that layout. This
script measures that choice on the embedded backbone (ImageNet EfficientNet-Lite0, grey input, 2-class head):

* ``fine-tune step``: forward, cross-entropy, backward, AdamW step on a batch of ``--batch`` images;
* ``SSL step``: medtl's ``SimCLR`` objective on two views of ``--ssl-batch`` images, backward, AdamW step;
* ``inference``: a forward pass over 256 images under ``torch.no_grad``.

Each layout gets a fresh model and one untimed warm-up step; the two layouts alternate in ``--rounds`` rounds and
each ratio is taken within a round (machines are noisy), then its median and every round's value are printed.

Run: ``.venv/bin/python benchmarks/channels_last_cpu.py`` (about 3 minutes on 2 cores); set ``OMP_NUM_THREADS`` to
measure another thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from medtl.models import create_backbone
from medtl.ssl import SimCLR

BACKBONE = "efficientnet_lite0.imagenet"


def _layout(tensor: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _images_per_second(step: Callable[[], None], images: int, steps: int) -> float:
    step()  # warm-up, untimed: the first call pays for oneDNN's kernel selection
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * images / (time.perf_counter() - t0)


def finetune_step(channels_last: bool, batch: int, size: int, steps: int) -> float:
    model = create_backbone(BACKBONE, num_classes=2).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x, y = _layout(torch.randn(batch, 1, size, size), channels_last), torch.randint(0, 2, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

    return _images_per_second(step, batch, steps)


def ssl_step(channels_last: bool, batch: int, size: int, steps: int) -> float:
    model = create_backbone(BACKBONE, num_classes=0).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    objective = SimCLR(model.num_features)
    views = {f"view{i}": _layout(torch.randn(batch, 1, size, size), channels_last) for i in (1, 2)}
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(objective.parameters()), lr=1e-4)

    def step() -> None:
        objective(model, views)[0].backward()
        optimizer.step()
        optimizer.zero_grad()

    return _images_per_second(step, batch, steps)


def inference(channels_last: bool, size: int, steps: int) -> float:
    model = create_backbone(BACKBONE, num_classes=2).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = _layout(torch.randn(256, 1, size, size), channels_last)

    @torch.no_grad()
    def step() -> None:
        model(x)

    return _images_per_second(step, 256, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ssl-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    workloads = {"fine-tune step": lambda cl: finetune_step(cl, args.batch, args.size, args.steps),
                 "SSL step": lambda cl: ssl_step(cl, args.ssl_batch, args.size, args.steps),
                 "inference": lambda cl: inference(cl, args.size, args.steps)}
    print(f"EfficientNet-Lite0, {args.size} px, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| workload | contiguous images/s | channels_last images/s | ratio (median) | rounds |")
    print("|---|---:|---:|---:|---|")
    for name, measure in workloads.items():
        contiguous, channels_last = [], []
        for _ in range(args.rounds):
            contiguous.append(measure(False))
            channels_last.append(measure(True))
        ratios = [b / a for a, b in zip(contiguous, channels_last)]
        print(f"| {name} | {statistics.median(contiguous):.1f} | {statistics.median(channels_last):.1f} | "
              f"{statistics.median(ratios):.2f}× | {', '.join(f'{r:.2f}' for r in ratios)} |", flush=True)


if __name__ == "__main__":
    main()
