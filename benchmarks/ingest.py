"""Ingest speed next to DP training speed, measured side by side in one run.

On ``--images`` synthetic CT files (fl-synth, one site) with the run's default settings: cold decode (an empty
cache), warm cache opened and read (best of 5), and one round of patient-level DP-SGD on the cached training split.
Ingest is measured before torch is imported, as in ``fl-client --check``; the targets (issue 3) are warm ≥ 100× and
cold ≥ 10× the DP training throughput. docs/benchmarks.md says what each line times.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.harness import cores

if TYPE_CHECKING:
    from client.data.dataset import SiteData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128, help="Rows and columns of the synthetic DICOMs.")
    parser.add_argument("--workers", type=int, default=0, help="Decoding processes (0 = one per core).")
    args = parser.parse_args()

    from client.data.dataset import load_site_data
    from common.config import RunConfig
    from simulations.synth import synthesize

    run = RunConfig()
    with tempfile.TemporaryDirectory(prefix="fedrad-bench-") as tmp:
        root = Path(tmp)
        synthesize(root / "data", sites=["A"], images_per_site=args.images, seed=0, size=args.size)

        def load(work: str, workers: int) -> SiteData:
            return load_site_data(
                data_dir=root / "data" / "A", work_dir=root / work, config=run.preprocess, classes=run.classes,
                val_fraction=run.val_fraction, seed=run.seed, workers=workers,
            )

        start = time.perf_counter()
        data = load("work", args.workers)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        load("work-1", 1)
        cold_one_s = time.perf_counter() - start
        warm_s = read_s = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            warm = load("work", args.workers)
            opened = time.perf_counter()
            warm.images()
            done = time.perf_counter()
            warm_s, read_s = min(warm_s, done - start), min(read_s, done - opened)

        import torch

        from client.app.training import patient_groups, train_dp
        from common.models import build_model

        train = data.train
        images, labels = data.images(train), data.labels[train]
        groups = patient_groups([data.patients[i] for i in train])
        model = build_model(run.model, image_size=run.preprocess.image_size)
        start = time.perf_counter()
        train_dp(  # what a site runs each round: patient-level DP, secure mode
            model, images=images, labels=labels, groups=groups, epochs=run.local_epochs,
            batch_size=run.batch_size, slices_per_patient=run.slices_per_patient,
            learning_rate=run.learning_rate, optimizer=run.optimizer, momentum=run.momentum,
            max_grad_norm=run.max_grad_norm, noise_multiplier=1.0,
            device=torch.device("cpu"), secure_mode=True, seed=0,
        )
        dp_rate = run.local_epochs * len(train) / (time.perf_counter() - start)

    n = len(data)
    print(f"fedrad ingest benchmark: {n} synthetic CT files {args.size}x{args.size} → {run.preprocess.image_size} "
          f"px, {cores()} cores, torch threads {torch.get_num_threads()}")
    print(f"{'measure':<44}{'images/s':>12}{'× DP training':>16}{'target':>10}")
    for label, rate, target in (("DP training (fedrad-cnn, Opacus, 1 round)", dp_rate, ""),
                                ("cold decode, all cores", n / cold_s, "≥ 10"),
                                ("cold decode, one process", n / cold_one_s, ""),
                                ("warm cache, read images", n / read_s, "≥ 100"),
                                ("warm cache, open (stat every file) + read", n / warm_s, "")):
        print(f"{label:<44}{rate:>12.0f}{rate / dp_rate:>16.2f}{target:>10}")


if __name__ == "__main__":
    main()
