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


def test_init_weights_with_resume_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_superlink: list[list[str]]
) -> None:
    code, err = serve(capsys, tmp_path, "--init-weights", tmp_path / "w.pt", "--resume", tmp_path / "runs" / "1")
    assert code == 2 and "`--resume`" in err


@pytest.mark.parametrize(
    ("given", "hint"),
    [
        ('init-weights="/w.pt"', "use --init-weights FILE"),
        (f'init-weights-sha256="{"a" * 64}"', "use --init-weights FILE"),
        ('workdir="/elsewhere"', "use --workdir"),
        ('runs-dir="/elsewhere"', "<--workdir>/runs"),
        ('resume-run-id="12"', "use fl-server --resume"),
        ('transport="tls"', "--insecure"),
        ('site-nodes="1:A"', "enrolled sites"),
        ('sim-sites="/t.json"', "fl-sim"),
    ],
)
def test_keys_fedrad_sets_are_refused_in_run_config_naming_the_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_superlink: list[list[str]], given: str, hint: str
) -> None:
    code, err = serve(capsys, tmp_path, "-c", f"batch-size=16 {given}")
    key = given.partition("=")[0]
    assert code == 2 and err.startswith(f"error: `{key}` is set by fedrad, not with --run-config: ")
    assert err.count("\n") == 1 and hint in err and not no_superlink


@pytest.fixture()
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The run config of every run fl-server would submit; submitting stops the command instead."""
    from flwr.common.config import parse_config_args

    configs: list[dict[str, Any]] = []

    def record(*_args: Any, config_args: list[str], **_kwargs: Any) -> None:
        configs.append(parse_config_args(config_args))
        raise _NotStarted("validation passed; no SuperLink in unit tests")

    monkeypatch.setattr(coordinator, "run_federation", record)
    return configs


def _encoding(config: dict[str, Any]) -> tuple[float, int]:
    return config["secagg-clipping-range"], config["secagg-quantization-range"]


def test_the_secagg_encoding_is_sized_from_the_initial_weights_unless_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    import torch

    serve(capsys, tmp_path)  # the seeded model: every |w| <= 1
    assert _encoding(submitted[-1]) == (8.0, 1 << 22)
    state = dict(build_model("fedrad-cnn").state_dict())
    state["2.weight"] = state["2.weight"].clone()
    state["2.weight"].view(-1)[0] = -8.3  # a public-pretrained model with a large weight
    path = tmp_path / "big.pt"
    torch.save(state, path)
    code, err = serve(capsys, tmp_path, "--init-weights", path)
    assert code == FederationError.exit_code and "no SuperLink in unit tests" in err
    assert _encoding(submitted[-1]) == (64.0, 1 << 24)  # 4 x 8.3 -> 64; levels at most 2**24
    serve(capsys, tmp_path, "--init-weights", path, "-c", "secagg-clipping-range=20.0")
    assert _encoding(submitted[-1]) == (20.0, 1 << 24)  # the user's range; levels sized from it
    code, err = serve(capsys, tmp_path, "--init-weights", path, "-c", "secagg-clipping-range=8.0")
    assert code == 2 and "secagg-clipping-range" in err and "(8.3)" in err  # the user's range is too tight
    serve(capsys, tmp_path, "-c", "secagg=false")
    assert len(submitted) == 4 and "secagg-clipping-range" not in submitted[-1]  # nothing to size without SecAgg+


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


def test_enroll_and_rekey_write_the_given_data_settings_into_the_kit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.kit import load_kit
    from server.enroll import Consortium

    workdir = tmp_path / "server"

    def run(*argv: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exited:
            cli.main([*argv, "--workdir", str(workdir)])
        return int(exited.value.code or 0), capsys.readouterr().err

    assert run("enroll", "--site", "A", "-c", "image-size=32 window='voi'")[0] == 0
    data = load_kit(Consortium(workdir).kit_dir("A")).data
    assert data is not None and data["image-size"] == 32 and data["window"] == "voi"
    assert run("rekey", "--site", "A", "-c", "image-size=48")[0] == 0
    data = load_kit(Consortium(workdir).kit_dir("A")).data
    assert data is not None and data["image-size"] == 48 and data["window"] == "voi"  # earlier settings kept
    code, err = run("enroll", "--site", "B", "-c", "batch-size=3")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "batch-size" in err


def test_a_stale_run_that_finishes_before_it_is_stopped_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def flwr_cli(args: list[str], env: dict[str, str]) -> dict[str, Any]:
        calls.append(args)
        if args[0] == "ls":
            return {"runs": [{"run-id": 7, "status": "running"}, {"run-id": 8, "status": "running"},
                             {"run-id": 9, "status": "finished:completed"}]}
        if args[1] == "7":  # Flower noticed its ServerApp had stopped heartbeating between `ls` and `stop`
            raise FederationError("`flwr stop` failed: [code: 18] Run is already finished")
        return {}

    monkeypatch.setattr(superlink, "flwr_cli", flwr_cli)
    superlink.stop_stale_runs({})
    assert [c[:2] for c in calls[1:]] == [["stop", "7"], ["stop", "8"]]
    monkeypatch.setattr(superlink, "flwr_cli", lambda args, env: (
        {"runs": [{"run-id": 7, "status": "running"}]} if args[0] == "ls" else (_ for _ in ()).throw(
            FederationError("`flwr stop` failed: connection refused"))))
    with pytest.raises(FederationError, match="connection refused"):
        superlink.stop_stale_runs({})
