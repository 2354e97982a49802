"""Initial weights from a file (``--init-weights FILE``): read, hash and check them against a run's model.

FILE is a safetensors file or a ``torch.save``'d state dict, read with ``weights_only=True``:
a file that pickles anything but tensors is refused, never run. It must hold exactly the
run model's ``state_dict()`` (names, shapes, finite floating-point values), after removing one
wrapper prefix shared by every name (``module.``, Opacus' ``_module.``, ``model.``).
The launchers pass its absolute path and SHA-256 in the run config; the ServerApp refuses
the file if its SHA-256 changed since, so the hash in ``report.json`` is that of the weights used.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from common.config import INIT_WEIGHTS_KEY, INIT_WEIGHTS_SHA256_KEY
from common.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from common.config import Launch, RunConfig

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_module.", "model.")
OPTION = "--init-weights"
_T = TypeVar("_T")
_FIX = "save the run model's state_dict() with safetensors.torch.save_file or torch.save"


def _what(option: str) -> str:
    return f"`{option}` FILE"


def _read(path: Path, option: str, read: Callable[[io.BufferedReader], _T]) -> _T:
    """``read`` applied to the opened file; a :class:`ConfigError` naming ``option`` if it is missing or unreadable."""
    if not path.exists():
        raise ConfigError(f"Expected {_what(option)} to be a file, but {path} does not exist; check the path")
    if not path.is_file():
        raise ConfigError(
            f"Expected {_what(option)} to be a file, but {path} is not a regular file; give the weights file"
        )
    try:
        with path.open("rb") as handle:
            return read(handle)
    except OSError as exc:
        raise ConfigError(
            f"Expected {_what(option)} to be a readable file, but {path} cannot be read ({exc.strerror or exc}); "
            "check its permissions"
        ) from None


def file_sha256(path: Path, *, option: str = OPTION) -> str:
    """The SHA-256 of a file's bytes as lower-case hex; a :class:`ConfigError` naming ``option`` if unreadable."""
    return _read(path, option, lambda handle: hashlib.file_digest(handle, "sha256").hexdigest())


def _short(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    hint = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(exc).__name__)
    hint = hint.removeprefix("error: ").split(" was not an allowed global")[0].split(". ")[0]
    return hint if len(hint) <= 160 else hint[:157] + "..."


def _parse(data: bytes, path: Path, option: str) -> Any:
    """The object a safetensors file or a ``torch.save`` file holds (tensors only)."""
    import pickle

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    # A safetensors file: an 8-byte little-endian header length, then a JSON object.
    if path.suffix == ".safetensors" or (len(data) >= 9 and data[8:9] == b"{"):
        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"Expected {_what(option)} to be a valid safetensors file, but {path} is not ({_short(exc)}); "
                f"it may be truncated or corrupt; {_FIX}"
            ) from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise ConfigError(
                f"Expected {_what(option)} to hold only tensors (a state dict), but {path} pickles other objects "
                f"({_short(exc)}); {_FIX}"
            ) from None
        reason = "neither"
    except Exception as exc:  # noqa: BLE001 - damaged bytes make torch.load raise many kinds; all mean "unreadable"
        reason = f"neither ({_short(exc)})"
    raise ConfigError(
        f"Expected {_what(option)} to be a safetensors file or a torch.save'd state dict, but {path} is {reason}; "
        f"it may be truncated or corrupt; {_FIX}"
    )


def _tensors(obj: Any, path: Path, option: str) -> dict[str, torch.Tensor]:
    import torch

    if not isinstance(obj, Mapping) or not obj:
        kind = "an empty dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ConfigError(f"Expected {_what(option)} to hold a dict of named tensors, but {path} holds {kind}; {_FIX}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"Expected {_what(option)} to hold a dict of named tensors, but entry {key!r} in {path} is of type "
                f"{type(value).__name__}, not a tensor; {_FIX} (the state dict alone, not a training checkpoint)"
            )
    return dict(obj)


def _strip_prefix(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Remove one wrapper prefix shared by every name, when no name matches the model's as is."""
    if set(state) & set(expected):
        return state
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def _listed(keys: list[str], shapes: Mapping[str, Any]) -> str:
    first = f"`{keys[0]}` {_shape(shapes[keys[0]].shape)}"
    return first + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _check_state_dict(
    state: Mapping[str, torch.Tensor], *, expected: Mapping[str, torch.Tensor], path: Path, option: str
) -> OrderedDict[str, torch.Tensor]:
    """CPU copies of ``state``'s tensors checked against the model's ``expected``, in its order and dtypes."""
    import torch

    state = _strip_prefix(dict(state), expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {_listed(missing, expected)}")
        if unexpected:
            parts.append(f"has {_listed(unexpected, state)}, which the model lacks")
        raise ConfigError(
            f"Expected {_what(option)} to hold the tensors of the run's model ({len(expected)} tensors), but {path} "
            f"{' and '.join(parts)}; {_FIX} (same model, image-size and classes as the run)"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, reference in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ConfigError(
                f"Expected {_what(option)} tensor `{key}` to have the run model's shape {_shape(reference.shape)}, "
                f"but {path} holds {_shape(tensor.shape)}; {_FIX} (same model, image-size and classes as the run)"
            )
        if not tensor.is_floating_point():
            raise ConfigError(
                f"Expected {_what(option)} to hold floating-point weights, but tensor `{key}` in {path} is "
                f"{str(tensor.dtype).removeprefix('torch.')}; {_FIX}"
            )
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ConfigError(
                f"Expected {_what(option)} to hold finite weights, but tensor `{key}` in {path} has {bad} NaN or "
                "infinite values; use weights from a run that did not diverge"
            )
        out[key] = tensor.detach().to(device="cpu", dtype=reference.dtype, copy=True).contiguous()
    return out


def load_init_weights(
    path: Path, *, model: nn.Module, expected_sha256: str | None = None, option: str = OPTION
) -> tuple[OrderedDict[str, torch.Tensor], str]:
    """The weights in a file, checked against ``model``, and the SHA-256 of the very bytes they were read from.

    A :class:`ConfigError` says in one line what is wrong with the file and what to do.

    Parameters
    ----------
    path, model
        A safetensors file or a ``torch.save``'d state dict, and the run's model (:func:`model_for_run`):
        the names, shapes, dtypes and order of the weights returned.
    expected_sha256
        If given, the file's SHA-256 must be this (hex): the file has not changed since it was checked.
    option
        The option that named the file, for the error messages.
    """
    path = Path(path)
    data = _read(path, option, lambda handle: handle.read())
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ConfigError(
            f"Expected {_what(option)} {path} to be unchanged since it was checked (sha256 {expected_sha256}), but its "
            f"sha256 is now {digest}; put the original file back, or start a new run with the new one"
        )
    state = _tensors(_parse(data, path, option), path, option)
    return _check_state_dict(state, expected=model.state_dict(), path=path, option=option), digest


def model_for_run(run: RunConfig) -> nn.Module:
    """The run's model with its seeded initial weights (what the ServerApp starts from)."""
    from common.models import build_model

    return build_model(run.model, image_size=run.preprocess.image_size, num_classes=len(run.classes), seed=run.seed)


def init_weights_config(
    path: Path, *, run: RunConfig, expected_sha256: str | None = None, option: str = OPTION
) -> dict[str, str]:
    """Check a weights file against ``run``'s model: ``{"init-weights": <absolute path>, "init-weights-sha256": <hex>}``.

    Parameters
    ----------
    path
        A safetensors file or a ``torch.save``'d state dict; ``~`` is expanded and the path made absolute.
    run
        The checked run config: its model, image size, classes and seed build the model the file must fit.
    expected_sha256, option
        As for :func:`load_init_weights` (e.g. the SHA-256 a scenario pins).
    """
    path = Path(path).expanduser().resolve()
    _, digest = load_init_weights(path, model=model_for_run(run), expected_sha256=expected_sha256, option=option)
    return {INIT_WEIGHTS_KEY: str(path), INIT_WEIGHTS_SHA256_KEY: digest}


def run_init_weights(launch: Launch, *, model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The initial weights a run's config names (``init-weights``), re-checked against their SHA-256 and ``model``."""
    if not launch.init_weights.path:
        raise ConfigError("Expected `init-weights` in the run config, but it is empty")
    weights, digest = load_init_weights(
        Path(launch.init_weights.path), model=model, expected_sha256=launch.init_weights.sha256, option=INIT_WEIGHTS_KEY
    )
    log.info("Initial weights: %s (sha256 %s)", launch.init_weights.path, digest)
    return weights


def sized_encoding(
    run_config: Mapping[str, Any], *, run: RunConfig, start: Mapping[str, torch.Tensor] | None, sites: int | None
) -> dict[str, Any]:
    """A run's SecAgg+ encoding (:func:`common.config.sized_secagg`) sized from its initial weights and checked
    against them: what fl-server and fl-sim set.

    Parameters
    ----------
    run_config, run
        The run config so far (explicit ``secagg-*`` values win over sizing), and the same checked.
    start
        The initial weights from ``--init-weights``; ``None``: the run's seeded model.
    sites
        How many sites may take part in a round; ``None`` when unknown (256 assumed).
    """
    from common.config import SecAggConfig, check_model_fits, largest_magnitude, sized_secagg

    encoding = sized_secagg(
        run_config, sites=sites,
        largest_weight=lambda: largest_magnitude((start or model_for_run(run).state_dict()).values()),
    )
    if start is not None:
        check_model_fits(start, SecAggConfig.from_flower({**run_config, **encoding}))
    return encoding
