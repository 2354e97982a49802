"""Initial weights from a file: formats, hashes and one-line errors (common/weights.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.config import Launch, RunConfig
from common.errors import ConfigError
from common.models import build_model
from common.weights import (
    file_sha256,
    init_weights_config,
    load_init_weights,
    model_for_run,
    run_init_weights,
)

RUN = RunConfig.from_flower({})  # fedrad-cnn, 64 px, binary


def _state(name: str = "fedrad-cnn", *, num_classes: int = 2, seed: int = 7) -> dict[str, torch.Tensor]:
    return dict(build_model(name, num_classes=num_classes, seed=seed).state_dict())


def _one_line_error(path: Path, match: str, **kwargs: object) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        load_init_weights(path, model=model_for_run(RUN), **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and message.startswith("Expected ")
    return message


def test_a_safetensors_file_loads_and_its_sha256_is_that_of_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    state = _state()
    save_file(state, str(path))
    weights, digest = load_init_weights(path, model=model_for_run(RUN))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert list(weights) == list(model_for_run(RUN).state_dict())
    assert all(torch.equal(weights[k], state[k]) for k in weights)


def test_a_torch_state_dict_loads_with_a_wrapper_prefix_and_is_cast_to_the_models_dtype(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    state = _state()
    torch.save({f"module.{k}": v.double() for k, v in state.items()}, path)
    weights, digest = load_init_weights(path, model=model_for_run(RUN))
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(weights[k].dtype == torch.float32 and torch.allclose(weights[k], state[k]) for k in state)


def test_weights_of_another_model_name_the_first_missing_and_unexpected_tensor(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(_state("plain-cnn"), str(path))
    message = _one_line_error(path, "lacks `2.weight` \\[16, 8, 3, 3\\]")
    assert "which the model lacks" in message and "(and 10 more)" in message


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    path = tmp_path / "three-classes.pt"
    torch.save(_state(num_classes=3), path)
    _one_line_error(path, "`6.weight` to have the run model's shape \\[1, 16\\], but .* holds \\[3, 16\\]")


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda data: os.urandom(256), "safetensors file or a torch.save'd state dict"),
        (lambda data: data[: len(data) // 2], "valid safetensors file"),
        (lambda data: data[:5], "safetensors file or a torch.save'd state dict"),
        (lambda data: b"", "safetensors file or a torch.save'd state dict"),
    ],
    ids=["random-bytes", "truncated", "truncated-header", "empty"],
)
def test_a_corrupt_file_is_one_line(tmp_path: Path, damage, match: str) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "good.bin"
    save_file(_state(), str(good))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(good.read_bytes()))
    _one_line_error(bad, match)


def test_a_truncated_torch_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(_state(), path)
    path.write_bytes(path.read_bytes()[:300])
    _one_line_error(path, "safetensors file or a torch.save'd state dict")


def test_what_is_not_a_plain_dict_of_finite_floating_tensors_is_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pt"
    torch.save(build_model("plain-cnn"), pickled)  # a whole module: never unpickled
    assert "Unsupported global" in _one_line_error(pickled, "to hold only tensors")
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, **_state()}, checkpoint)
    _one_line_error(checkpoint, "entry 'epoch' .* is of type int, not a tensor")
    integers = tmp_path / "int.safetensors"
    save_file({k: v.long() for k, v in _state().items()}, str(integers))
    _one_line_error(integers, "floating-point weights, but tensor `2.weight` .* is int64")
    nan = tmp_path / "nan.safetensors"
    state = _state()
    state["6.bias"] = torch.tensor([float("nan")])
    save_file(state, str(nan))
    _one_line_error(nan, "finite weights, but tensor `6.bias` .* has 1 NaN")


def test_a_missing_path_a_folder_and_a_changed_file_are_one_line(tmp_path: Path) -> None:
    _one_line_error(tmp_path / "nope.pt", "to be a file, but .* does not exist")
    _one_line_error(tmp_path, "not a regular file")
    with pytest.raises(ConfigError, match="does not exist"):
        file_sha256(tmp_path / "nope.pt")
    path = tmp_path / "w.safetensors"
    save_file(_state(), str(path))
    _one_line_error(path, "to be unchanged since it was checked", expected_sha256="0" * 64)


def test_the_run_config_carries_the_checked_file_and_the_serverapp_reloads_it(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    state = _state(seed=11)
    save_file(state, str(path))
    entries = init_weights_config(tmp_path / "." / "w.safetensors", run=RUN)
    assert entries == {"init-weights": str(path), "init-weights-sha256": file_sha256(path)}
    launch = Launch.from_flower(entries)
    assert launch.init_weights.path == str(path)
    weights = run_init_weights(launch, model=model_for_run(RUN))
    assert all(torch.equal(weights[k], state[k]) for k in state)
    save_file(_state(seed=12), str(path))  # changed after the launcher checked it
    with pytest.raises(ConfigError, match="unchanged since it was checked"):
        run_init_weights(launch, model=model_for_run(RUN))


@pytest.mark.parametrize(
    "values",
    [
        {"init-weights": "/w.pt"},
        {"init-weights-sha256": "a" * 64},
        {"init-weights": "w.pt", "init-weights-sha256": "a" * 64},
        {"init-weights": "/w.pt", "init-weights-sha256": "xyz"},
    ],
)
def test_the_run_config_keys_go_together_and_are_checked(values: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="init-weights"):
        Launch.from_flower(values)


def test_fl_sim_checks_the_scenarios_init_weights_before_anything_runs(tmp_path: Path) -> None:
    from simulations import scenario
    from simulations.run import run_overrides

    good = tmp_path / "w.safetensors"
    save_file(_state(), str(good))
    args = {"workdir": tmp_path, "runs_dir": tmp_path / "runs", "table": tmp_path / "t.json"}
    overrides = run_overrides(scenario.load("tiny", [f'run.init-weights="{good}"']), **args)
    assert overrides["init-weights-sha256"] == file_sha256(good)
    plain = tmp_path / "plain.safetensors"
    save_file(_state("plain-cnn"), str(plain))
    with pytest.raises(ConfigError, match="lacks `2.weight`"):
        run_overrides(scenario.load("tiny", [f'run.init-weights="{plain}"']), **args)


def test_fl_sim_refuses_init_weights_secagg_could_not_mask(tmp_path: Path) -> None:
    """As fl-server does: a weight beyond half the SecAgg+ clipping range stops the run before it starts."""
    from safetensors.torch import save_file

    from common.models import build_model
    from simulations.run import checked_init_weights

    state = {k: v.clone().contiguous() for k, v in build_model("fedrad-cnn", seed=0).state_dict().items()}
    next(iter(state.values())).view(-1)[0] = 8.3
    path = tmp_path / "big.safetensors"
    save_file(state, str(path))
    with pytest.raises(ConfigError, match=r"secagg-clipping-range.*\(8\.3\)"):
        checked_init_weights({"init-weights": str(path), "secagg": True, "secagg-clipping-range": 8.0})
    entries = checked_init_weights({"init-weights": str(path), "secagg": True, "secagg-clipping-range": 32.0})
    assert entries["init-weights"] == str(path.resolve())
    assert checked_init_weights({"init-weights": str(path), "secagg": False})["init-weights-sha256"]
