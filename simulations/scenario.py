"""fl-sim scenarios: TOML files under ``simulations/scenarios/``, overridable on the command line.

A scenario says which virtual hospitals exist and what data they hold
(``[sites]``), what each one's privacy budget is (``[privacy]``), how the
federation trains (``[run]``: any key of the project's
``[tool.flwr.app.config]``) and how many sites run at once (``[simulation]``).
``--set section.key=value`` overrides one value (the value is TOML:
``--set run.num-server-rounds=3``, ``--set sites.images=[400,800]``).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from common.config import INIT_WEIGHTS_KEY, INIT_WEIGHTS_SHA256_KEY, refuse_launch_keys, site_name
from common.errors import ConfigError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
DEFAULT_SCENARIO = "default"
SECTIONS = ("sites", "privacy", "run", "simulation")
SOURCES = ("synth", "folder")
# Run-config keys fl-sim sets itself; a scenario cannot.
# fl-sim takes the initial weights from the scenario: `fl-sim run --init-weights FILE` sets `run.init-weights`.
SCENARIO_LAUNCH_KEYS = (INIT_WEIGHTS_KEY, INIT_WEIGHTS_SHA256_KEY)
_Spec = TypeVar("_Spec")
_T = TypeVar("_T")


def per_site(values: tuple[_T, ...], count: int) -> list[_T]:
    """One value per site: the single value of ``values`` for each of ``count`` sites, else ``values`` itself."""
    return list(values) * count if len(values) == 1 else list(values)


@dataclass(frozen=True)
class SitesSpec:
    """The virtual hospitals and their data."""

    count: int = 3
    names: tuple[str, ...] = ()
    source: str = "synth"
    images: tuple[int, ...] = (1000,)  # one value for every site, or one per site
    prevalence: tuple[float, ...] = ()  # per site; empty = the scanner profile's own (or Dirichlet skew)
    scanners: tuple[str, ...] = ()  # per site; empty = each site's own (hash of its name)
    alpha: float = 0.0  # Dirichlet label skew across sites; 0 = none
    image_size: int = 64  # synthetic DICOM size in pixels
    folder: str = ""  # source = "folder": a labelled DICOM folder to split into sites
    sizes: tuple[float, ...] = ()  # source = "folder": relative site sizes
    seed: int = 0

    def site_names(self) -> list[str]:
        """The sites' names: ``names`` when given, else ``site-001``, ``site-002``, ... (``count`` of them)."""
        if self.names:
            return list(self.names)
        if self.source == "folder":
            return [f"site-{i + 1:03d}" for i in range(self.count)]
        width = max(3, len(str(self.count)))
        return [f"site-{i + 1:0{width}d}" for i in range(self.count)]

    def images_per_site(self) -> list[int]:
        """Images of each site: the single value of ``images`` for every site, else one value per site."""
        return per_site(self.images, self.count)

    def data_key(self) -> str:
        """Hash of everything that decides the sites' data: equal keys share one generated copy."""
        spec = {**self.__dict__, "names": self.site_names()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PrivacySpec:
    """Each virtual site's own privacy choices (its node config)."""

    dp: bool = True
    epsilon: tuple[float, ...] = (8.0,)  # one value for every site, or one per site
    delta: float = 1e-5
    unit: str = "patient"
    secure_mode: bool = True  # DP noise from the OS CSPRNG; false makes noise reproducible (tests only)


@dataclass(frozen=True)
class SimulationSpec:
    concurrency: int = 2  # sites that train at the same time (Ray actors)
    threads_per_site: int = 1


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    sites: SitesSpec = SitesSpec()
    privacy: PrivacySpec = PrivacySpec()
    run: dict[str, Any] = field(default_factory=dict)
    simulation: SimulationSpec = SimulationSpec()

    def epsilons(self) -> list[float]:
        """Each site's ``max-epsilon``: the single value of ``privacy.epsilon`` for every site, else one per site."""
        return per_site(self.privacy.epsilon, self.sites.count)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the run report (sites, privacy, run, simulation)."""
        def table(spec: object) -> dict[str, Any]:
            return {k.replace("_", "-"): v for k, v in spec.__dict__.items()}

        return {"name": self.name, "description": self.description, "sites": table(self.sites),
                "privacy": table(self.privacy), "run": dict(self.run), "simulation": table(self.simulation)}


def scenario_path(name_or_path: str) -> Path:
    """A scenario file: a path, or the name of one under ``simulations/scenarios/``."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"Expected a scenario file at {path}, but there is none")
        return path
    candidate = SCENARIO_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
        raise ConfigError(f"Expected a scenario name ({known}) or a .toml file, but got {name_or_path!r}")
    return candidate


def available() -> dict[str, str]:
    """Bundled scenarios: name → description."""
    out = {}
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        with path.open("rb") as handle:
            out[path.stem] = str(tomllib.load(handle).get("description", ""))
    return out


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` → (section, key, TOML value); bare words are strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"Expected `--set section.key=value` (e.g. run.num-server-rounds=3), but got {text!r}")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"Expected `--set` section to be one of {', '.join(SECTIONS)}, but got {section!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key.strip(), value


def load(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """Read a scenario and apply ``--set`` overrides; validate everything once."""
    path = scenario_path(name_or_path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Expected valid TOML in {path}, but it does not parse ({exc})") from exc
    for extra in sorted(set(data) - {*SECTIONS, "name", "description"}):
        raise ConfigError(f"Expected sections {', '.join(SECTIONS)} in {path}, but got [{extra}]")
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})[key] = value
    return build(data, default_name=path.stem)


def _value(section: str, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"Expected `{section}.{key}` to be {kind.__name__}, but got {value!r}")
    return value


def _list(section: str, key: str, value: Any, kind: type) -> tuple[Any, ...]:
    try:
        return tuple(_value(section, key, v, kind) for v in (value if isinstance(value, list) else [value]))
    except ConfigError:
        raise ConfigError(f"Expected `{section}.{key}` to hold {kind.__name__} values, but got {value!r}") from None


def _section(cls: type[_Spec], data: dict[str, Any], section: str) -> _Spec:
    """``[section]`` as ``cls``: each field from its key (``_`` → ``-``), of the field's type; defaults elsewhere."""
    table, values = dict(data.get(section, {})), {}
    for name, hint in get_type_hints(cls).items():
        key = name.replace("_", "-")
        if key in table:
            many = get_origin(hint) is tuple
            read = _list if many else _value
            values[name] = read(section, key, table.pop(key), get_args(hint)[0] if many else hint)
    if table:
        raise ConfigError(f"Expected known keys in [{section}], but got {', '.join(sorted(table))}")
    return cls(**values)


def build(data: dict[str, Any], *, default_name: str = "scenario") -> Scenario:
    """Validate parsed TOML into a :class:`Scenario`."""
    sites = _section(SitesSpec, data, "sites")
    names = sites.names
    if names and "count" not in data.get("sites", {}):
        sites = replace(sites, count=len(names))
    if names and len(names) != sites.count:
        raise ConfigError(f"Expected {sites.count} names in `sites.names`, but got {len(names)}")
    for n in names:
        site_name(n)
    if len(set(names)) != len(names):
        raise ConfigError("Expected distinct names in `sites.names`")
    if sites.count < 1:
        raise ConfigError(f"Expected `sites.count` to be at least 1, but got {sites.count}")
    if sites.source not in SOURCES:
        raise ConfigError(f"Expected `sites.source` to be one of {', '.join(SOURCES)}, but got {sites.source!r}")
    if sites.source == "folder" and not sites.folder:
        raise ConfigError("Expected `sites.folder` (a labelled DICOM folder) with `sites.source = \"folder\"`")
    for key, values in (("images", sites.images), ("prevalence", sites.prevalence), ("scanners", sites.scanners),
                        ("sizes", sites.sizes)):
        if len(values) not in (0, 1, sites.count) or (key == "images" and not values):
            raise ConfigError(f"Expected one value or {sites.count} values in `sites.{key}`, but got {len(values)}")
    if any(n < 1 for n in sites.images):
        raise ConfigError(f"Expected `sites.images` to be at least 1, but got {list(sites.images)}")
    if sites.alpha < 0:
        raise ConfigError(f"Expected `sites.alpha` to be 0 (no skew) or positive, but got {sites.alpha}")
    if sites.alpha and sites.prevalence:
        raise ConfigError("Expected either `sites.alpha` (Dirichlet label skew) or `sites.prevalence`, not both")

    privacy = _section(PrivacySpec, data, "privacy")
    if len(privacy.epsilon) not in (1, sites.count) or any(e <= 0 for e in privacy.epsilon):
        raise ConfigError(
            f"Expected `privacy.epsilon` to be one positive value or {sites.count}, but got {list(privacy.epsilon)}"
        )

    run = dict(data.get("run", {}))
    refuse_launch_keys(run, option="a scenario's [run] (--set run.KEY=...)", allowed=SCENARIO_LAUNCH_KEYS)

    simulation = _section(SimulationSpec, data, "simulation")
    if simulation.concurrency < 1 or simulation.threads_per_site < 1:
        raise ConfigError("Expected `simulation.concurrency` and `simulation.threads-per-site` to be at least 1")
    return Scenario(name=str(data.get("name", default_name)), description=str(data.get("description", "")),
                    sites=sites, privacy=privacy, run=run, simulation=simulation)
