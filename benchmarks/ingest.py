"""Ingest speed next to DP training speed, measured side by side in one run.

    python -m benchmarks.ingest [--images 2000] [--size 128] [--workers 0]

Writes ``--images`` synthetic CT files (fl-synth, one site), then measures on
this machine, with the run's default settings:

* cold decode: ``load_site_data`` on an empty cache (read, hash, decode,
  window, resize, write the cache; ``--workers`` processes, 0 = all cores);
* warm cache, open: ``load_site_data`` on the fresh cache — ``stat`` of every
  data file to prove nothing changed, index, labels, split — plus reading the
  images into memory (what each ClientApp process does before training), best
  of 5;
* warm cache, read: drawing the cached images (what every later epoch and
  round reads instead of DICOM), best of 5;
* DP training: one round of the default model (``fedrad-cnn``) with Opacus
  patient-level DP-SGD on the cached training split, as a site runs it:
  ``local-epochs`` × train images / time.

Cold and warm ingest are measured before torch is imported, as in
``fl-client --check``. The targets (issue 3) are warm ≥ 100× and cold ≥ 10×
the DP training throughput.
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
        data_dir = root / "data" / "A"

        def load(work: Path, workers: int) -> SiteData:
            return load_site_data(
                data_dir=data_dir, work_dir=work, config=run.preprocess, classes=run.classes,
                val_fraction=run.val_fraction, seed=run.seed, workers=workers,
            )

        start = time.perf_counter()
        data = load(root / "work", args.workers)
        cold_s = time.perf_counter() - start
        n = len(data)
        start = time.perf_counter()
        load(root / "work-1", 1)
        cold_one_s = time.perf_counter() - start

        warm_s = read_s = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            warm = load(root / "work", args.workers)
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
        dp_s = time.perf_counter() - start
        dp_rate = run.local_epochs * len(train) / dp_s

    cold, cold_one, warm_rate, read_rate = n / cold_s, n / cold_one_s, n / warm_s, n / read_s
    print(f"fedrad ingest benchmark: {n} synthetic CT files {args.size}x{args.size} → {run.preprocess.image_size} px, "
          f"{cores()} cores, torch threads {torch.get_num_threads()}")
    print(f"{'measure':<44}{'images/s':>12}{'× DP training':>16}{'target':>10}")
    print(f"{'DP training (fedrad-cnn, Opacus, 1 round)':<44}{dp_rate:>12.0f}{1.0:>16.2f}{'':>10}")
    print(f"{'cold decode, all cores':<44}{cold:>12.0f}{cold / dp_rate:>16.2f}{'≥ 10':>10}")
    print(f"{'cold decode, one process':<44}{cold_one:>12.0f}{cold_one / dp_rate:>16.2f}{'':>10}")
    print(f"{'warm cache, read images':<44}{read_rate:>12.0f}{read_rate / dp_rate:>16.2f}{'≥ 100':>10}")
    print(f"{'warm cache, open (stat every file) + read':<44}{warm_rate:>12.0f}{warm_rate / dp_rate:>16.2f}{'':>10}")


if __name__ == "__main__":
    main()
