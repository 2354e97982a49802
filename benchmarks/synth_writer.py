"""fl-synth with its series encoder next to pydicom's own writer, side by side in one run.

Two sites of ``--images`` files per size by :func:`simulations.synth.synthesize`, with the series encoder and with
``Dataset.save_as(enforce_file_format=True)`` (the same bytes), alternating, best of ``--repeats``: slices/s of the
whole generation and the ratio. The encoder stays while pydicom's writer is more than ~1.5x slower (issue 16, item 8).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

from pydicom.dataset import Dataset

from simulations.synth import synthesize, write


class _SaveAs:
    """pydicom's own writer, in place of the series encoder (same constructor and method)."""

    def __init__(self, ds: Dataset) -> None:
        pass

    def encode(self, ds: Dataset) -> bytes:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()


def _slices_per_s(root: Path, *, images: int, size: int) -> float:
    out = Path(tempfile.mkdtemp(dir=root))
    start = time.perf_counter()
    synthesize(out, sites=["A", "B"], images_per_site=images, size=size)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out)
    return 2 * images / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,32,64,128", help="Image sizes (px), comma-separated")
    parser.add_argument("--images", type=int, default=200, help="Files per site (two sites).")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    writers = {"series encoder": write._SeriesEncoder, "pydicom save_as": _SaveAs}
    print(f"{'size':>5} {'series encoder':>16} {'pydicom save_as':>16} {'encoder / pydicom':>18}")
    with tempfile.TemporaryDirectory(prefix="fedrad-bench-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            best = dict.fromkeys(writers, 0.0)
            for _ in range(args.repeats):
                for name, encoder in writers.items():
                    with mock.patch.object(write, "_SeriesEncoder", encoder):
                        best[name] = max(best[name], _slices_per_s(Path(tmp), images=args.images, size=size))
            fast, slow = best.values()
            print(f"{size:>5} {fast:>14.0f}/s {slow:>14.0f}/s {fast / slow:>17.2f}x")


if __name__ == "__main__":
    main()
