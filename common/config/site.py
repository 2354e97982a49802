"""A site's own choices (Flower's ``node_config``): its data, work directory, privacy budget and device.

Anything a site must control comes from the node config only, whatever the run config says.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config.launch import Launch
from common.config.values import choice, non_negative_float, non_negative_int, positive_float, site_name
from common.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRIVACY_UNITS = ("patient", "image")  # what one DP "record" is: all of a patient's images, or one image
PARTITION_ID_KEY = "partition-id"  # node config key Flower's simulation runtime sets


def _flag(node_config: Mapping[str, Any], key: str) -> bool:
    value = node_config.get(key, True)
    if not isinstance(value, bool):
        raise ConfigError(f"Expected `{key}` to be true or false, but got {value!r}")
    return value


@dataclass(frozen=True)
class SiteConfig:
    """A site's own choices (Flower ``node_config``); the coordinator cannot override them."""

    site: str
    data_dir: Path
    work_dir: Path
    max_epsilon: float = 8.0
    delta: float = 1e-5
    device: str = "auto"
    secure_mode: bool = True  # DP sampling/noise from the OS CSPRNG; off only in tests
    threads: int = 0  # torch CPU threads; 0 = torch's default
    privacy_unit: str = "patient"
    noise_multiplier: float = 0.0  # the site's own fixed σ; 0 = calibrate σ to the run's plan
    dp: bool = True  # False only for fl-sim's non-private baselines; fl-client always trains with DP
    ledger_dir: Path | None = None  # fl-sim: one fresh ledger per simulated run; default work_dir/privacy

    @property
    def privacy_dir(self) -> Path:
        """Where the site's ledger and its signing key live."""
        return self.ledger_dir if self.ledger_dir is not None else self.work_dir / "privacy"

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """Build and validate from Flower's ``context.node_config``."""
        for key in ("site", "data-dir", "work-dir"):
            if key not in node_config:
                raise ConfigError(
                    f"Expected `{key}` in the node config, but it is missing; "
                    "start the SuperNode with `fl-client`"
                )
        delta = positive_float("delta", node_config.get("delta", 1e-5))
        if delta >= 1:
            raise ConfigError(f"Expected `delta` to be below 1, but got {delta!r}")
        return cls(
            site=site_name(node_config["site"]),
            data_dir=Path(str(node_config["data-dir"])),
            work_dir=Path(str(node_config["work-dir"])),
            max_epsilon=positive_float("max-epsilon", node_config.get("max-epsilon", 8.0)),
            delta=delta,
            device=choice("device", node_config.get("device", "auto"), DEVICES),
            secure_mode=_flag(node_config, "secure-mode"),
            threads=non_negative_int("threads", node_config.get("threads", 0)),
            privacy_unit=choice("privacy-unit", node_config.get("privacy-unit", "patient"), PRIVACY_UNITS),
            noise_multiplier=non_negative_float("noise-multiplier", node_config.get("noise-multiplier", 0.0)),
            dp=_flag(node_config, "dp"),
            ledger_dir=Path(str(node_config["ledger-dir"])) if node_config.get("ledger-dir") else None,
        )

    @classmethod
    def from_context(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteConfig:
        """The site's config for a message: its node config, or its row of fl-sim's site table.

        Flower's simulation gives a virtual SuperNode only a ``partition-id``, its row in the table
        the run config's ``sim-sites`` names; a real SuperNode never has one, so a coordinator
        cannot use ``sim-sites`` to change a real site's settings.
        """
        sim_sites = Launch.from_flower(run_config).sim_sites
        if PARTITION_ID_KEY not in node_config or not sim_sites:
            return cls.from_flower(node_config)
        table, partition_id = Path(sim_sites), int(node_config[PARTITION_ID_KEY])
        try:
            row = dict(json.loads(table.read_text())[partition_id])  # fl-sim's table: a JSON list of node configs
        except (OSError, ValueError, IndexError, TypeError) as exc:
            raise ConfigError(
                f"Expected fl-sim's site table {table} to hold a node config for partition {partition_id}, "
                f"but it could not be read ({exc}); rerun fl-sim"
            ) from exc
        return cls.from_flower(row)

    def to_flower(self) -> str:
        """Render as a ``--node-config`` string for ``flower-supernode``."""
        items = {
            "site": self.site,
            "data-dir": str(self.data_dir),
            "work-dir": str(self.work_dir),
            "max-epsilon": float(self.max_epsilon),
            "delta": float(self.delta),
            "device": self.device,
            "secure-mode": self.secure_mode,
            "threads": self.threads,
            "privacy-unit": self.privacy_unit,
            "noise-multiplier": float(self.noise_multiplier),
        }
        parts = []
        for key, value in items.items():
            if isinstance(value, bool):
                parts.append(f"{key}={'true' if value else 'false'}")
            elif isinstance(value, str):
                if '"' in value or "\\" in value:
                    raise ConfigError(f"Expected `{key}` without quotes or backslashes, but got {value!r}")
                parts.append(f'{key}="{value}"')
            else:
                parts.append(f"{key}={value!r}")
        return " ".join(parts)
