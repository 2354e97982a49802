"""fl-server's checks that run before anything starts (no SuperLink is ever started here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import save_file

from common.errors import FederationError
from common.models import build_model
from common.processes import free_port
from common.weights import file_sha256
from server import cli, coordinator, superlink


class _NotStarted(FederationError):
    """Raised instead of starting the SuperLink."""


@pytest.fixture()
def no_superlink(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every run config fl-server checked; starting the SuperLink stops the command instead."""
    checked: list[list[str]] = []
    real = coordinator.check_run_config

    def spy(config_args: list[str]) -> Any:
        checked.append(list(config_args))
        return real(config_args)

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise _NotStarted("validation passed; no SuperLink in unit tests")

    monkeypatch.setattr(coordinator, "check_run_config", spy)
    monkeypatch.setattr(superlink, "start_superlink", refuse)
    return checked


def serve(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str | Path) -> tuple[int, str]:
    args = ["--insecure", "--port", str(free_port()), "--workdir", str(tmp_path / "server"), *map(str, argv)]
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    return int(exited.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("bad", ["plain-cnn", "random-bytes", "missing"])
def test_bad_init_weights_are_one_line_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_superlink: list[list[str]], bad: str
) -> None:
    path = tmp_path / "w.safetensors"
    if bad == "plain-cnn":
        save_file(dict(build_model("plain-cnn").state_dict()), str(path))
    elif bad == "random-bytes":
        path.write_bytes(b"\x00not weights at all" * 10)
    code, err = serve(capsys, tmp_path, "--init-weights", path)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: Expected `--init-weights` FILE to ")
    assert "Traceback" not in err and "no SuperLink" not in err


def test_good_init_weights_go_into_the_run_config_with_their_sha256(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_superlink: list[list[str]]
) -> None:
    path = tmp_path / "w.pt"
    import torch

    torch.save(dict(build_model("fedrad-cnn", num_classes=3).state_dict()), path)
    code, err = serve(capsys, tmp_path, "--init-weights", path, "-c", 'classes="a,b,c"')
    assert code == FederationError.exit_code and "no SuperLink in unit tests" in err
    assert f'init-weights="{path}" init-weights-sha256="{file_sha256(path)}"' in no_superlink[-1][0]
    code, err = serve(capsys, tmp_path, "--init-weights", path)  # the run's model has one logit, not three
    assert code == 2 and "`6.weight` to have the run model's shape [1, 16]" in err


def test_init_weights_without_their_hash_or_with_resume_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_superlink: list[list[str]]
) -> None:
    code, err = serve(capsys, tmp_path, "-c", 'init-weights="/w.pt"')
    assert code == 2 and "init-weights-sha256" in err and "--init-weights FILE" in err
    code, err = serve(capsys, tmp_path, "--init-weights", tmp_path / "w.pt", "--resume", tmp_path / "runs" / "1")
    assert code == 2 and "`--resume`" in err


def test_write_connection_points_flwr_at_the_loopback_superlink(tmp_path: Path) -> None:
    import tomllib

    superlink.write_connection(tmp_path / "plain", 9093)
    superlink.write_connection(tmp_path / "tls", 9094, ca_cert=tmp_path / "ca.crt")
    plain = tomllib.loads((tmp_path / "plain" / "config.toml").read_text())
    assert plain == {"superlink": {"default": "fedrad", "fedrad": {"address": "127.0.0.1:9093", "insecure": True}}}
    tls = tomllib.loads((tmp_path / "tls" / "config.toml").read_text())["superlink"]["fedrad"]
    assert tls == {"address": "127.0.0.1:9094", "root-certificates": str(tmp_path / "ca.crt")}


def test_run_config_values_reach_flower_unchanged() -> None:
    from flwr.common.config import parse_config_args

    values = {"transport": "insecure (plain HTTP on 127.0.0.1:1)", "window": "brän", "lr": 1e-05, "rounds": 3,
              "secagg": False, "path": "C:\\w.pt"}
    assert parse_config_args([" ".join(f"{k}={coordinator.toml_value(v)}" for k, v in values.items())]) == values
