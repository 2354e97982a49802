"""Non-DP and DP-SGD training speed side by side, for each Opacus per-sample-gradient mode.

On fixed random images, each mode's DP-SGD run (``make_private``: Poisson sampling, C = 1, σ = 1) is paired with a
plain run (shuffling ``DataLoader``, no Opacus), the order alternating and the pairs interleaved over ``--repeats``,
so machine noise hits both sides alike; the table keeps the best of the repeats and the range of the paired ratios.
docs/benchmarks.md has the method and the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.harness import cores

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

MODES = ("hooks", "functorch", "ew", "ghost")
NOISE_MULTIPLIER = MAX_GRAD_NORM = 1.0
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
    x = torch.from_numpy(rng.standard_normal((images, 1, size, size), dtype=np.float32))
    return TensorDataset(x, torch.from_numpy(rng.integers(0, 2, size=images).astype(np.float32)))


def run(dataset: TensorDataset, mode: str | None, args: argparse.Namespace, *, epochs: int,
        max_steps: int | None = None) -> tuple[float, float]:
    """Images/s of one training run (non-DP when ``mode`` is None, else that ``grad_sample_mode``), and the seconds
    in ``make_private``; ``epochs`` epochs of at most ``max_steps`` steps."""
    import torch
    from torch.utils.data import DataLoader

    from common.models import build_model

    torch.manual_seed(SEED)  # DataLoader shuffling and Opacus' Poisson sampler use the global generator
    model = build_model(args.model, image_size=args.size, num_classes=2, seed=SEED).train()
    optimizer, criterion = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE), torch.nn.BCEWithLogitsLoss()
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=mode is None)  # DP: Poisson, 1 / len(loader)
    start = time.perf_counter()
    if mode is not None:
        from opacus import PrivacyEngine

        private = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=True,
            grad_sample_mode=mode, noise_generator=torch.Generator().manual_seed(SEED + 1),
        )
        model, optimizer, loader = private[0], private[1], private[-1]
        criterion = private[2] if mode == "ghost" else criterion  # ghost wraps it: backward() runs two passes
    setup, start, seen = time.perf_counter() - start, time.perf_counter(), 0
    for _ in range(epochs):  # the training loop of client.app.training.train_dp
        for step, (x, y) in enumerate(loader):
            if max_steps is not None and step >= max_steps:
                break
            optimizer.zero_grad()
            criterion(model(x).squeeze(1), y).backward()
            optimizer.step()
            seen += len(y)
    return seen / (time.perf_counter() - start), setup


def _dp(fig: Figures, *call: Any, **kw: Any) -> bool:
    """``run(*call, **kw)`` for a DP mode, its figures added to ``fig`` (its error, when it raises)."""
    try:
        rate, setup = run(*call, **kw)
    except Exception as exc:  # noqa: BLE001 - a failing mode is a result, not a crash
        lines = str(exc).strip().splitlines()
        fig.error = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:110]
        return False
    if kw.get("max_steps") is None:
        fig.dp.append(rate)
        fig.setup.append(setup)
    return True


def measure(args: argparse.Namespace, dataset: TensorDataset, modes: list[str]) -> dict[str, Figures]:
    """Interleaved non-DP/DP pairs for every mode, ``args.repeats`` times."""
    figures = {mode: Figures() for mode in modes}
    run(dataset, None, args, epochs=1, max_steps=2)  # warm-up: oneDNN primitives, allocator
    for mode, fig in figures.items():
        _dp(fig, dataset, mode, args, epochs=1, max_steps=2)
    for repeat in range(args.repeats):
        for mode, fig in figures.items():
            for side in ((None, mode) if repeat % 2 == 0 else (mode, None)) if not fig.error else ():
                if side is None:
                    fig.nondp.append(run(dataset, None, args, epochs=args.epochs)[0])
                elif not _dp(fig, dataset, mode, args, epochs=args.epochs):
                    break
    return figures


def report(args: argparse.Namespace, figures: dict[str, Figures], threads: int, params: int) -> None:
    """Print the table: per mode, the best non-DP and DP images/s, their ratio, the paired ratios, setup time."""
    print(f"fedrad DP overhead: {args.model} ({params:,} trainable parameters), {args.images:,} synthetic "
          f"{args.size}x{args.size} images, batch {args.batch_size} (DP: Poisson), {args.epochs} epoch(s), "
          f"Adam, C={MAX_GRAD_NORM:g}, sigma={NOISE_MULTIPLIER:g}")
    print(f"{cores()} cores, torch threads {threads}; best of {args.repeats} interleaved non-DP/DP pairs per mode")
    header = f"{'mode':<11}{'non-DP img/s':>14}{'DP img/s':>11}{'DP/non-DP':>11}{'pair ratios':>14}{'setup ms':>10}"
    print(f"{header}\n{'-' * len(header)}")
    best: tuple[float, str] | None = None
    for mode, fig in figures.items():
        if fig.error or not fig.dp:
            print(f"{mode:<11}error: {fig.error}")
            continue
        nondp, dp = max(fig.nondp), max(fig.dp)
        pairs = [d / n for d, n in zip(fig.dp, fig.nondp, strict=False)]
        spread, setup_ms = f"{min(pairs):.2f}-{max(pairs):.2f}", statistics.median(fig.setup) * 1e3
        print(f"{mode:<11}{nondp:>14,.0f}{dp:>11,.0f}{dp / nondp:>11.2f}{spread:>14}{setup_ms:>10.1f}")
        best = (dp, mode) if best is None or dp > best[0] else best
    if best is not None:
        all_nondp, (dp, mode) = max(r for fig in figures.values() for r in fig.nondp), best
        print(f"best DP mode: {mode}, {dp:,.0f} img/s = {dp / all_nondp:.2f} x the best non-DP run "
              f"of all modes ({all_nondp:,.0f} img/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    for flag, default, text in (("--images", 1000, "Synthetic training images."),
                                ("--size", 64, "Rows and columns of each image."),
                                ("--batch-size", 64, "(Expected) batch size."),
                                ("--epochs", 1, "Epochs per timed run."),
                                ("--threads", 0, "torch CPU threads (0 = one per core)."),
                                ("--repeats", 7, "Timed non-DP/DP pairs per mode.")):
        parser.add_argument(flag, type=int, default=default, help=text)
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
    torch.set_num_threads(args.threads or cores())
    warnings.filterwarnings("ignore", module=r"opacus\..*")  # secure-mode and hook-mode notices
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # input needs no grad: fine
    params = sum(p.numel() for p in build_model(args.model, image_size=args.size).parameters() if p.requires_grad)
    report(args, measure(args, synthetic_dataset(args.images, args.size), modes), torch.get_num_threads(), params)


if __name__ == "__main__":
    main()
