"""channels_last against NCHW on CPU: one SGD training step and one forward of resnet20 and
resnet56 (batch 64, 1 x 28 x 28 inputs, 10 classes), one thread, median of 15 after warm-up.

    OMP_NUM_THREADS=1 python benchmarks/channels_last_cpu.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdbench.models.resnet_cifar import resnet20, resnet56


def bench(channels_last: bool, model_fn: Callable[..., torch.nn.Module], train: bool) -> float:
    torch.manual_seed(0)
    model = model_fn(10, 1)
    x = torch.randn(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        if train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)

    for _ in range(3):
        step()
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for fn in (resnet20, resnet56):
        for train in (True, False):
            nchw, cl = bench(False, fn, train), bench(True, fn, train)
            what = "train step" if train else "forward"
            print(f"{fn.__name__} {what}: NCHW {nchw:.1f} ms, channels_last {cl:.1f} ms, {nchw / cl:.2f}x")


if __name__ == "__main__":
    main()
