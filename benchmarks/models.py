"""Clinical-size CNNs under DP-SGD: speed and peak memory per model, side by side.

    python -m benchmarks.models [--device cpu|cuda] [--models resnet18,resnet50,densenet121]
                                [--sizes 224] [--extra resnet18@512] [--batch-size 64]
                                [--patients 8] [--slices 16] [--steps 5] [--json PATH]

For each model and image size, every mode runs in its own Python process (so
each peak-memory figure is that mode's alone: CUDA max allocated on a GPU, peak
RSS on the CPU), on fixed random 1-channel images and random binary labels:

* ``plain``: non-DP SGD steps of ``--batch-size`` images (the baseline);
* ``plain-bf16``: the same under bf16 autocast (CUDA only);
* ``hooks``: image-level DP-SGD, Opacus per-sample gradients (hooks), batches of
  ``--batch-size`` images, clipping C = 1, sigma = 1;
* ``ghost``: image-level DP-SGD with fast gradient clipping (Opacus' ``ghost``
  mode: per-sample gradient norms, then a second backward pass);
* ``patient``: patient-level DP-SGD with fedrad's own ``client.app.training.train_dp``
  (Poisson sampling of ``--patients`` patients per step, ``--slices`` slices
  each, per-image gradients averaged per patient before clipping), over four
  expected steps; images/s counts the slices of the sampled patients.

Models are torchvision's constructors with BatchNorm replaced by GroupNorm
(Opacus' ``ModuleValidator.fix``) and a 1-channel stem and a single logit;
``fedrad-cnn`` is the registered small default. Speeds are images per second
over ``--steps`` timed steps after one untimed warm-up step. DP/non-DP ratios
compare each DP mode with ``plain`` of the same model and size in this run.
torchvision must import beside torch (it does in a CUDA build; this project's
CPU install does not carry it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import types
import warnings
from typing import Any

MODES = ("plain", "plain-bf16", "hooks", "ghost", "patient")
TORCHVISION = ("resnet18", "resnet34", "resnet50", "densenet121")


def _residual_forward(block: Any, x: Any) -> Any:
    """torchvision's BasicBlock/Bottleneck forward with ``out + identity`` instead of the in-place ``+=``."""
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(block.relu(out)))
    identity = block.downsample(x) if block.downsample is not None else x
    return block.relu(out + identity)


def build(name: str, size: int = 64) -> Any:
    """A one-logit, 1-channel, GroupNorm model: torchvision's ``name`` or a registered fedrad model."""
    import torch

    torch.manual_seed(0)
    if name not in TORCHVISION:
        from common.models import build_model

        return build_model(name, image_size=size)
    import torchvision.models as tvm
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(getattr(tvm, name)(weights=None, num_classes=1))
    stem_owner, attr = (model.features, "conv0") if name.startswith("densenet") else (model, "conv1")
    old = getattr(stem_owner, attr)
    setattr(stem_owner, attr, torch.nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False))
    for module in model.modules():  # Opacus' backward hooks cannot see through in-place ReLUs
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
        if isinstance(module, (tvm.resnet.BasicBlock, tvm.resnet.Bottleneck)):
            module.forward = types.MethodType(_residual_forward, module)
    if name.startswith("densenet"):  # its forward() applies an in-place functional ReLU: rebuild it as modules
        model = torch.nn.Sequential(model.features, torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), model.classifier)
    if ModuleValidator.validate(model, strict=False):
        raise SystemExit(f"{name}: Opacus' ModuleValidator still finds layers to fix")
    return model


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: Any) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(model_name: str, size: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``mode`` for one model and size in this process; images/s and peak memory."""
    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    model = build(model_name, size).to(device).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if mode == "patient":
        from client.app.training import train_dp

        patients = 4 * args.patients
        rng = np.random.default_rng(0)
        images = rng.standard_normal((patients * args.slices, 1, size, size), dtype=np.float32)
        labels = np.repeat(rng.integers(0, 2, patients), args.slices)
        groups = np.repeat(np.arange(patients), args.slices)
        kw = dict(epochs=1, batch_size=args.patients, learning_rate=0.1, max_grad_norm=1.0, noise_multiplier=1.0,
                  device=device, secure_mode=False, seed=0, slices_per_patient=args.slices)
        warm = args.patients * args.slices  # one expected step, untimed
        train_dp(model, images=images[:warm], labels=labels[:warm], groups=groups[:warm], **kw)
        _sync(device)
        start = time.perf_counter()
        train_dp(build(model_name, size).to(device), images=images, labels=labels, groups=groups, **kw)
        _sync(device)
        return {"params": params, "img_s": len(images) / (time.perf_counter() - start), "peak_mb": _peak_mb(device)}

    x = torch.randn(args.batch_size, 1, size, size, device=device)
    y = torch.randint(0, 2, (args.batch_size,), device=device).float()
    criterion = torch.nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if mode in ("hooks", "ghost"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
        private = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
        )
        model, optimizer = private[0], private[1]
        if mode == "ghost":
            criterion = private[2]
    autocast = mode == "plain-bf16"

    def step() -> None:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = criterion(model(x).squeeze(1).float(), y)
        loss.backward()
        optimizer.step()

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return {"params": params, "img_s": args.steps * args.batch_size / (time.perf_counter() - start),
            "peak_mb": _peak_mb(device)}


def _error(exc: BaseException | str) -> dict[str, str]:
    lines = str(exc).strip().splitlines() or ["no output"]
    return {"error": f"{type(exc).__name__}: {lines[0]}"[:100] if isinstance(exc, BaseException) else lines[-1][:100]}


def measure(model_name: str, size: int, modes: list[str], args: argparse.Namespace) -> None:
    """Run ``modes`` one after another in this process, one JSON line each (CUDA: peak reset per mode)."""
    import torch

    for mode in modes:
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            fig = one(model_name, size, mode, args)
        except Exception as exc:  # noqa: BLE001 - an out-of-memory mode is a result, not a crash
            fig = _error(exc)
        print(json.dumps({"mode": mode, **fig}), flush=True)


def _children(model_name: str, size: int, modes: list[str], argv: list[str], device: str) -> list[dict[str, Any]]:
    """One process per mode on the CPU (peak RSS is per process), one per model and size on CUDA."""
    groups = [modes] if device == "cuda" else [[m] for m in modes]
    figures: list[dict[str, Any]] = []
    for group in groups:
        cmd = [sys.executable, "-m", "benchmarks.models", *argv, "--one", f"{model_name}@{size}@{'+'.join(group)}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        figures += done
        figures += [{"mode": m, **_error(proc.stderr or proc.stdout)} for m in group[len(done):]]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default="resnet18,resnet50,densenet121")
    parser.add_argument("--sizes", default="224", help="Comma-separated image sizes for every model.")
    parser.add_argument("--extra", default="resnet18@512", help="More MODEL@SIZE pairs (comma-separated).")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per step (plain, hooks, ghost).")
    parser.add_argument("--patients", type=int, default=8, help="Expected patients per step (patient mode).")
    parser.add_argument("--slices", type=int, default=16, help="Slices per patient (patient mode).")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per mode.")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", default=None, help="Also write every figure here.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        model_name, size, modes = args.one.split("@")
        measure(model_name, int(size), modes.split("+"), args)
        return
    argv = [a for pair in (("--device", args.device), ("--batch-size", str(args.batch_size)),
                           ("--patients", str(args.patients)), ("--slices", str(args.slices)),
                           ("--steps", str(args.steps))) for a in pair]
    pairs = [(m, int(s)) for m in args.models.split(",") if m for s in args.sizes.split(",") if s]
    pairs += [(p.split("@")[0], int(p.split("@")[1])) for p in args.extra.split(",") if p]
    modes = [m for m in args.modes.split(",") if m and not (m == "plain-bf16" and args.device == "cpu")]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    rows: list[dict[str, Any]] = []
    print(f"fedrad models under DP-SGD on {args.device}: batch {args.batch_size} images; patient mode "
          f"{args.patients} patients x {args.slices} slices per step; {args.steps} timed steps; C=1, sigma=1")
    print(f"{'model':<12}{'px':>5}{'params':>12}{'update MB':>10}  {'mode':<11}{'img/s':>9}{'x plain':>9}{'peak MB':>10}")
    for model_name, size in pairs:
        base = None
        for fig in _children(model_name, size, modes, argv, args.device):
            fig = {"model": model_name, "size": size, **fig}
            mode = fig["mode"]
            rows.append(fig)
            if "error" in fig:
                print(f"{model_name:<12}{size:>5}{'':>22}  {mode:<11}error: {fig['error']}")
                continue
            base = fig["img_s"] if mode == "plain" else base
            ratio = f"{fig['img_s'] / base:.2f}" if base else "-"
            print(f"{model_name:<12}{size:>5}{fig['params']:>12,}{fig['params'] * 4 / 1e6:>10.1f}  {mode:<11}"
                  f"{fig['img_s']:>9,.1f}{ratio:>9}{fig['peak_mb']:>10,.0f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"device": args.device, "argv": sys.argv[1:], "rows": rows}, fh, indent=1)
    if rows and all("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
