"""Clinical-size CNNs under DP-SGD: speed and peak memory per model, side by side.

Per model and size, on fixed random 1-channel images: non-DP SGD (``plain``; ``plain-bf16`` under bf16 autocast, CUDA
only), image-level DP-SGD (C = 1, sigma = 1) with Opacus' ``hooks`` and ``ghost``, and fedrad's patient-level
``train_dp`` (``patient``): images/s after a warm-up step, the ratio to ``plain``, peak memory (CUDA max allocated,
or the peak RSS of a process per mode). torchvision's models need torchvision beside torch. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

MODES = ("plain", "plain-bf16", "hooks", "ghost", "patient")
TORCHVISION = ("resnet18", "resnet34", "resnet50", "densenet121")


def _residual_forward(block: Any, x: Any) -> Any:
    """torchvision's BasicBlock/Bottleneck forward with ``out + identity`` instead of the in-place ``+=``."""
    out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(block.relu(out)))
    return block.relu(out + (block.downsample(x) if block.downsample is not None else x))


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
    owner, attr = (model.features, "conv0") if name.startswith("densenet") else (model, "conv1")
    old = getattr(owner, attr)
    setattr(owner, attr, torch.nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False))
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


def _sync(device: Any) -> float:
    """Wait for ``device``'s queued work; the peak memory so far, MB (CUDA: max allocated; CPU: peak RSS)."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(model_name: str, size: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ``mode`` for one model and size in this process; images/s and peak memory."""
    import numpy as np
    import torch

    warnings.filterwarnings("ignore")
    if (device := torch.device(args.device)).type == "cuda":  # each mode's own peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(model_name, size).to(device).train()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if mode == "patient":
        from client.app.training import train_dp

        patients, rng = 4 * args.patients, np.random.default_rng(0)
        images = rng.standard_normal((patients * args.slices, 1, size, size), dtype=np.float32)
        labels, groups = (np.repeat(v, args.slices) for v in (rng.integers(0, 2, patients), np.arange(patients)))
        kw: dict[str, Any] = {"epochs": 1, "batch_size": args.patients, "learning_rate": 0.1, "seed": 0,
                              "max_grad_norm": 1.0, "noise_multiplier": 1.0, "device": device, "secure_mode": False,
                              "slices_per_patient": args.slices}
        warm = args.patients * args.slices  # one expected step, untimed
        train_dp(model, images=images[:warm], labels=labels[:warm], groups=groups[:warm], **kw)
        _sync(device)
        start = time.perf_counter()
        train_dp(build(model_name, size).to(device), images=images, labels=labels, groups=groups, **kw)
        count = len(images)
    else:
        x = torch.randn(args.batch_size, 1, size, size, device=device)
        y = torch.randint(0, 2, (args.batch_size,), device=device).float()
        criterion, optimizer = torch.nn.BCEWithLogitsLoss(), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if mode in ("hooks", "ghost"):
            from opacus import PrivacyEngine
            from torch.utils.data import DataLoader, TensorDataset

            loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
            private = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=1.0,
                max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
            )
            model, optimizer = private[0], private[1]
            criterion = private[2] if mode == "ghost" else criterion
        for i in range(args.steps + 1):  # step 0 is an untimed warm-up
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "plain-bf16"):
                loss = criterion(model(x).squeeze(1).float(), y)
            loss.backward()
            optimizer.step()
            if i == 0:
                _sync(device)
                start = time.perf_counter()
        count = args.steps * args.batch_size
    peak_mb = _sync(device)
    return {"params": params, "img_s": count / (time.perf_counter() - start), "peak_mb": peak_mb}


def _error(exc: BaseException | str) -> dict[str, str]:
    lines = str(exc).strip().splitlines() or ["no output"]
    return {"error": f"{type(exc).__name__}: {lines[0]}"[:100] if isinstance(exc, BaseException) else lines[-1][:100]}


def _children(model_name: str, size: int, modes: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One process per mode on the CPU (peak RSS is per process), one per model and size on CUDA."""
    figures: list[dict[str, Any]] = []
    for group in [modes] if args.device == "cuda" else [[m] for m in modes]:
        spec = f"{model_name}@{size}@{'+'.join(group)}"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.models", *sys.argv[1:], "--one", spec],
                              capture_output=True, text=True, timeout=900, check=False)
        done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        figures += [*done, *({"mode": m, **_error(proc.stderr or proc.stdout)} for m in group[len(done):])]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default="resnet18,resnet50,densenet121")
    parser.add_argument("--sizes", default="224", help="Comma-separated image sizes for every model.")
    parser.add_argument("--extra", default="resnet18@512", help="More MODEL@SIZE pairs (comma-separated).")
    for flag, default, text in (("--batch-size", 64, "Images per step (plain, hooks, ghost)."),
                                ("--patients", 8, "Expected patients per step (patient mode)."),
                                ("--slices", 16, "Slices per patient (patient mode)."),
                                ("--steps", 5, "Timed steps per mode.")):
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", default=None, help="Also write every figure here.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: its modes one after another, a JSON line each
        model_name, size, modes = args.one.split("@")
        for mode in modes.split("+"):
            try:
                fig = one(model_name, int(size), mode, args)
            except Exception as exc:  # noqa: BLE001 - an out-of-memory mode is a result, not a crash
                fig = _error(exc)
            print(json.dumps({"mode": mode, **fig}), flush=True)
        return
    pairs = [(m, int(s)) for m in args.models.split(",") if m for s in args.sizes.split(",") if s]
    pairs += [(p.split("@")[0], int(p.split("@")[1])) for p in args.extra.split(",") if p]
    modes = [m for m in args.modes.split(",") if m and not (m == "plain-bf16" and args.device == "cpu")]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    print(f"fedrad models under DP-SGD on {args.device}: batch {args.batch_size} images; patient mode "
          f"{args.patients} patients x {args.slices} slices per step; {args.steps} timed steps; C=1, sigma=1\n"
          f"{'model':<12}{'px':>5}{'params':>12}{'update MB':>10}  {'mode':<11}{'img/s':>9}{'x plain':>9}"
          f"{'peak MB':>10}")
    rows: list[dict[str, Any]] = []
    for model_name, size in pairs:
        base = None
        for fig in _children(model_name, size, modes, args):
            rows.append(fig := {"model": model_name, "size": size, **fig})
            if "error" in fig:
                print(f"{model_name:<12}{size:>5}{'':>22}  {fig['mode']:<11}error: {fig['error']}")
                continue
            base = fig["img_s"] if fig["mode"] == "plain" else base
            ratio = f"{fig['img_s'] / base:.2f}" if base else "-"
            print(f"{model_name:<12}{size:>5}{fig['params']:>12,}{fig['params'] * 4 / 1e6:>10.1f}  {fig['mode']:<11}"
                  f"{fig['img_s']:>9,.1f}{ratio:>9}{fig['peak_mb']:>10,.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "argv": sys.argv[1:], "rows": rows}, indent=1))
    sys.exit(1 if rows and all("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
