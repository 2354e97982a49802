"""Non-DP and DP-SGD training speed side by side, for each Opacus per-sample-gradient mode.

    python -m benchmarks.dp_overhead [--images 1000] [--size 64] [--batch-size 64] [--epochs 1]
                                     [--threads 0] [--repeats 7] [--model fedrad-cnn]
                                     [--modes hooks,functorch,ew,ghost]

Makes ``--images`` random but fixed synthetic images (numpy, seed 0; no DICOM)
with random binary labels, then measures on this machine, in one process:

* non-DP: the model (``--model``, default ``fedrad-cnn``), Adam, BCE on one
  logit, a plain shuffling ``DataLoader`` of ``--batch-size``, no Opacus;
* DP: the same with ``PrivacyEngine.make_private`` (Poisson sampling at rate
  batch size / images, per-sample clipping to C = 1, σ = 1) in each
  ``grad_sample_mode``: ``hooks`` (Opacus' per-layer grad samplers),
  ``functorch`` (``vmap(grad)`` per layer), ``ew`` (PyTorch expanded weights)
  and ``ghost`` (fast gradient clipping: per-sample gradient *norms*, then a
  second backward pass on the loss reweighted by the clipping factors; it
  needs the wrapped criterion ``make_private`` returns).

Images/s is the images the training steps actually processed (Poisson batches
vary in size) over the wall time of the ``--epochs`` loop, data loading
included; ``make_private`` is timed separately ("setup"). Each mode's DP run is
paired with a non-DP run right before or after it (the order alternates), and
the pairs are interleaved over ``--repeats``, so machine noise hits both
sides alike; the table shows the best of the repeats and the range of the
paired DP/non-DP ratios. An untimed warm-up step runs first for every mode;
a mode that raises prints its error instead of figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch.utils.data import TensorDataset

MODES = ("hooks", "functorch", "ew", "ghost")
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
LEARNING_RATE = 0.01  # the run config's default; speed does not depend on it
SEED = 0


@dataclass
class Figures:
    """Every repeat's figures for one mode."""

    nondp: list[float] = field(default_factory=list)  # images/s
    dp: list[float] = field(default_factory=list)  # images/s
    setup: list[float] = field(default_factory=list)  # seconds in make_private
    error: str | None = None


def synthetic_dataset(images: int, size: int) -> TensorDataset:
    """``images`` fixed random greyscale images ``(n, 1, size, size)`` and 0/1 labels (seed 0)."""
    import torch
    from torch.utils.data import TensorDataset

    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((images, 1, size, size), dtype=np.float32)
    y = rng.integers(0, 2, size=images).astype(np.float32)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _train(model: Any, optimizer: Any, criterion: Any, loader: Any, epochs: int, max_steps: int | None = None) -> int:
    """The training loop of ``client.app.training.train_dp``; returns the images it processed."""
    seen = 0
    for _ in range(epochs):
        for step, (x, y) in enumerate(loader):
            if max_steps is not None and step >= max_steps:
                break
            optimizer.zero_grad()
            loss = criterion(model(x).squeeze(1), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
    return seen


def _fresh(model_name: str, image_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module]:
    import torch

    from common.models import build_model

    torch.manual_seed(SEED)  # DataLoader shuffling and Opacus' Poisson sampler use the global generator
    model = build_model(model_name, image_size=image_size, num_classes=2, seed=SEED).train()
    return model, torch.optim.Adam(model.parameters(), lr=LEARNING_RATE), torch.nn.BCEWithLogitsLoss()


def run_nondp(
    dataset: TensorDataset, *, model_name: str, image_size: int, batch_size: int, epochs: int,
    max_steps: int | None = None,
) -> float:
    """One non-DP training run; images/s."""
    from torch.utils.data import DataLoader

    model, optimizer, criterion = _fresh(model_name, image_size)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    seen = _train(model, optimizer, criterion, loader, epochs, max_steps)
    return seen / (time.perf_counter() - start)


def run_dp(
    dataset: TensorDataset, mode: str, *, model_name: str, image_size: int, batch_size: int, epochs: int,
    max_steps: int | None = None,
) -> tuple[float, float]:
    """One DP-SGD training run in Opacus ``grad_sample_mode`` ``mode``; (images/s, setup seconds)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    model, optimizer, criterion = _fresh(model_name, image_size)
    loader = DataLoader(dataset, batch_size=batch_size)  # becomes Poisson sampling at rate 1 / len(loader)
    start = time.perf_counter()
    engine = PrivacyEngine(accountant="rdp")
    private = engine.make_private(
        module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
        noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=True,
        grad_sample_mode=mode, noise_generator=torch.Generator().manual_seed(SEED + 1),
    )
    if mode == "ghost":  # fast gradient clipping wraps the criterion: loss.backward() runs two passes
        dp_model, dp_optimizer, criterion, dp_loader = private
    else:
        dp_model, dp_optimizer, dp_loader = private
    setup = time.perf_counter() - start
    start = time.perf_counter()
    seen = _train(dp_model, dp_optimizer, criterion, dp_loader, epochs, max_steps)
    return seen / (time.perf_counter() - start), setup


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:110]


def measure(args: argparse.Namespace, dataset: TensorDataset, modes: list[str]) -> dict[str, Figures]:
    """Interleaved non-DP/DP pairs for every mode, ``args.repeats`` times."""
    kw = {"model_name": args.model, "image_size": args.size, "batch_size": args.batch_size}
    figures = {mode: Figures() for mode in modes}
    run_nondp(dataset, epochs=1, max_steps=2, **kw)  # warm-up: oneDNN primitives, allocator
    for mode, fig in figures.items():
        try:
            run_dp(dataset, mode, epochs=1, max_steps=2, **kw)
        except Exception as exc:  # noqa: BLE001 - a failing mode is a result, not a crash
            fig.error = _error(exc)
    for repeat in range(args.repeats):
        for mode, fig in figures.items():
            if fig.error:
                continue
            for side in ("nondp", "dp") if repeat % 2 == 0 else ("dp", "nondp"):
                if side == "nondp":
                    fig.nondp.append(run_nondp(dataset, epochs=args.epochs, **kw))
                    continue
                try:
                    rate, setup = run_dp(dataset, mode, epochs=args.epochs, **kw)
                except Exception as exc:  # noqa: BLE001
                    fig.error = _error(exc)
                    break
                fig.dp.append(rate)
                fig.setup.append(setup)
    return figures


def report(args: argparse.Namespace, figures: dict[str, Figures], threads: int, params: int) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"fedrad DP overhead: {args.model} ({params:,} trainable parameters), {args.images:,} synthetic "
        f"{args.size}x{args.size} images, batch {args.batch_size} (DP: Poisson), {args.epochs} epoch(s), "
        f"Adam, C={MAX_GRAD_NORM:g}, sigma={NOISE_MULTIPLIER:g}"
    )
    print(f"{cores} cores, torch threads {threads}; best of {args.repeats} interleaved non-DP/DP pairs per mode")
    header = f"{'mode':<11}{'non-DP img/s':>14}{'DP img/s':>11}{'DP/non-DP':>11}{'pair ratios':>14}{'setup ms':>10}"
    print(header)
    print("-" * len(header))
    best: tuple[float, str] | None = None
    for mode, fig in figures.items():
        if fig.error or not fig.dp:
            print(f"{mode:<11}error: {fig.error}")
            continue
        nondp, dp = max(fig.nondp), max(fig.dp)
        pairs = [d / n for d, n in zip(fig.dp, fig.nondp, strict=False)]
        spread = f"{min(pairs):.2f}-{max(pairs):.2f}"
        setup_ms = statistics.median(fig.setup) * 1e3
        print(f"{mode:<11}{nondp:>14,.0f}{dp:>11,.0f}{dp / nondp:>11.2f}{spread:>14}{setup_ms:>10.1f}")
        if best is None or dp > best[0]:
            best = (dp, mode)
    if best is not None:
        all_nondp = max(r for fig in figures.values() for r in fig.nondp)
        dp, mode = best
        print(
            f"best DP mode: {mode}, {dp:,.0f} img/s = {dp / all_nondp:.2f} x the best non-DP run "
            f"of all modes ({all_nondp:,.0f} img/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="Synthetic training images.")
    parser.add_argument("--size", type=int, default=64, help="Rows and columns of each image.")
    parser.add_argument("--batch-size", type=int, default=64, help="(Expected) batch size.")
    parser.add_argument("--epochs", type=int, default=1, help="Epochs per timed run.")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = one per core).")
    parser.add_argument("--repeats", type=int, default=7, help="Timed non-DP/DP pairs per mode.")
    parser.add_argument("--model", default="fedrad-cnn", help="A registered model (common.models).")
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated Opacus grad_sample_modes.")
    args = parser.parse_args()
    if min(args.images, args.size, args.batch_size, args.epochs, args.repeats) < 1 or args.threads < 0:
        parser.error("--images, --size, --batch-size, --epochs and --repeats must be positive")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    import torch

    from common.models import MODELS, build_model

    if args.model not in MODELS:
        parser.error(f"unknown model {args.model!r}; registered: {', '.join(sorted(MODELS))}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads or cores)
    warnings.filterwarnings("ignore", module=r"opacus\..*")  # secure-mode and hook-mode notices
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # input needs no grad: fine
    params = sum(p.numel() for p in build_model(args.model, image_size=args.size).parameters() if p.requires_grad)
    dataset = synthetic_dataset(args.images, args.size)
    figures = measure(args, dataset, modes)
    report(args, figures, torch.get_num_threads(), params)


if __name__ == "__main__":
    main()
