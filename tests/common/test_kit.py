"""Enrollment kits: a good kit loads; every kind of broken kit is refused with one line naming the file."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from common.errors import ConfigError
from common.kit import (
    CA_CERT_FILE,
    DATA_KEYS,
    FORMAT,
    KIT_FILE,
    KIT_FILES,
    KIT_KEYS,
    PRIVATE_KEY_FILE,
    PUBLIC_KEY_FILE,
    Kit,
    cert_fingerprint,
    check_data_settings,
    load_kit,
    parse_data_args,
    read_kit_toml,
    render_kit_toml,
    server_address,
    ssh_fingerprint,
)


def _openssh_private(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def _openssh_public(key: object) -> str:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def _ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def make_kit(
    kit_dir: Path, *, site: str = "A", server: str = "coord.example.org:9092", data: dict[str, object] | None = None
) -> Path:
    """A valid kit written with cryptography directly (independently of server.enroll); ``data``: its [data]."""
    kit_dir.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP384R1())
    public = _openssh_public(key) + " test"
    ca = _ca_pem()
    (kit_dir / PRIVATE_KEY_FILE).write_bytes(_openssh_private(key))
    (kit_dir / PRIVATE_KEY_FILE).chmod(0o600)
    (kit_dir / PUBLIC_KEY_FILE).write_text(public + "\n")
    (kit_dir / CA_CERT_FILE).write_bytes(ca)
    (kit_dir / KIT_FILE).write_text(render_kit_toml({
        "format": FORMAT, "site": site, "server": server, "fingerprint": ssh_fingerprint(public),
        "ca-fingerprint": cert_fingerprint(ca), "created": "2026-01-01T00:00:00+00:00",
    }, data=data))
    return kit_dir


@pytest.fixture
def kit_dir(tmp_path: Path) -> Path:
    return make_kit(tmp_path / "kit")


def _rewrite_toml(kit_dir: Path, **changes: str) -> None:
    fields = read_kit_toml(kit_dir / KIT_FILE)
    fields.update({k.replace("_", "-"): v for k, v in changes.items()})
    (kit_dir / KIT_FILE).write_text(render_kit_toml(fields))


def test_a_good_kit_loads(kit_dir: Path) -> None:
    kit = load_kit(kit_dir)
    assert isinstance(kit, Kit)
    assert (kit.site, kit.server) == ("A", "coord.example.org:9092")
    assert kit.private_key == kit_dir / PRIVATE_KEY_FILE
    assert kit.public_key == kit_dir / PUBLIC_KEY_FILE
    assert kit.ca_cert == kit_dir / CA_CERT_FILE
    assert kit.fingerprint.startswith("SHA256:")
    assert kit.ca_fingerprint == cert_fingerprint((kit_dir / CA_CERT_FILE).read_bytes())
    with pytest.raises(AttributeError):
        kit.site = "B"  # type: ignore[misc]


def test_ssh_fingerprint_is_sha256_of_the_key_blob(kit_dir: Path) -> None:
    line = (kit_dir / PUBLIC_KEY_FILE).read_text()
    blob = base64.b64decode(line.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert ssh_fingerprint(line) == expected


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_ssh_fingerprint_matches_ssh_keygen(kit_dir: Path) -> None:
    out = subprocess.run(["ssh-keygen", "-lf", str(kit_dir / PUBLIC_KEY_FILE)], check=True,
                         capture_output=True, text=True).stdout
    assert out.split()[1] == ssh_fingerprint((kit_dir / PUBLIC_KEY_FILE).read_text())


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_a_key_made_by_ssh_keygen_is_accepted(kit_dir: Path) -> None:
    """The format Flower's SuperNode expects is what ``ssh-keygen -t ecdsa -b 384`` writes."""
    key_path = kit_dir / PRIVATE_KEY_FILE
    key_path.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key_path)],
                   check=True, capture_output=True)
    public = key_path.with_name(key_path.name + ".pub").read_text()
    (kit_dir / PUBLIC_KEY_FILE).write_text(public)
    _rewrite_toml(kit_dir, fingerprint=ssh_fingerprint(public))
    assert load_kit(kit_dir).fingerprint == ssh_fingerprint(public)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_cert_fingerprint_matches_openssl(kit_dir: Path) -> None:
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in",
                          str(kit_dir / CA_CERT_FILE)], check=True, capture_output=True, text=True).stdout
    assert out.strip().split("=", 1)[1] == cert_fingerprint((kit_dir / CA_CERT_FILE).read_bytes())[7:]


@pytest.mark.parametrize("address", ["coord:9092", "10.0.0.1:1", "[::1]:9092", "a.b-c.org:65535"])
def test_server_address_accepts(address: str) -> None:
    assert server_address(address) == address


@pytest.mark.parametrize("address", ["coord", "coord:", ":9092", "coord:0", "coord:65536", "co rd:1", "::1:9092", 9092])
def test_server_address_rejects(address: object) -> None:
    with pytest.raises(ConfigError, match="Expected `server` to be an address"):
        server_address(address)


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No enrollment kit at"):
        load_kit(tmp_path / "nope")


@pytest.mark.parametrize("name", KIT_FILES)
def test_missing_file_is_named(kit_dir: Path, name: str) -> None:
    (kit_dir / name).unlink()
    with pytest.raises(ConfigError, match=f"lacks {name}"):
        load_kit(kit_dir)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_private_key_readable_by_others(kit_dir: Path, mode: int) -> None:
    (kit_dir / PRIVATE_KEY_FILE).chmod(mode)
    with pytest.raises(ConfigError, match="chmod 600") as err:
        load_kit(kit_dir)
    assert str(kit_dir / PRIVATE_KEY_FILE) in str(err.value)


def test_private_key_in_pem_not_openssh_format(kit_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    (kit_dir / PRIVATE_KEY_FILE).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="OpenSSH ECDSA P-384 private key .* could not read it"):
        load_kit(kit_dir)


def test_private_key_garbage(kit_dir: Path) -> None:
    (kit_dir / PRIVATE_KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="could not read it"):
        load_kit(kit_dir)


def test_private_key_of_wrong_curve(kit_dir: Path) -> None:
    (kit_dir / PRIVATE_KEY_FILE).write_bytes(_openssh_private(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError, match="got an ECDSA key on secp256r1"):
        load_kit(kit_dir)


def test_private_key_of_wrong_type(kit_dir: Path) -> None:
    (kit_dir / PRIVATE_KEY_FILE).write_bytes(_openssh_private(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(ConfigError, match="but got a .*Ed25519"):
        load_kit(kit_dir)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_encrypted_private_key(kit_dir: Path) -> None:
    key_path = kit_dir / PRIVATE_KEY_FILE
    key_path.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(key_path)],
                   check=True, capture_output=True)
    with pytest.raises(ConfigError, match="unencrypted OpenSSH"):
        load_kit(kit_dir)


def test_public_key_of_another_key(kit_dir: Path) -> None:
    other = _openssh_public(ec.generate_private_key(ec.SECP384R1()))
    (kit_dir / PUBLIC_KEY_FILE).write_text(other + "\n")
    _rewrite_toml(kit_dir, fingerprint=ssh_fingerprint(other))
    with pytest.raises(ConfigError, match="does not belong to"):
        load_kit(kit_dir)


def test_public_key_unparsable(kit_dir: Path) -> None:
    (kit_dir / PUBLIC_KEY_FILE).write_text("ecdsa-sha2-nistp384 garbage\n")
    with pytest.raises(ConfigError, match="Expected an OpenSSH public key line in"):
        load_kit(kit_dir)


def test_fingerprint_in_toml_does_not_match(kit_dir: Path) -> None:
    _rewrite_toml(kit_dir, fingerprint="SHA256:AAAA")
    with pytest.raises(ConfigError, match="names key SHA256:AAAA"):
        load_kit(kit_dir)


def test_ca_cert_unparsable(kit_dir: Path) -> None:
    (kit_dir / CA_CERT_FILE).write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="Cannot parse the CA certificate"):
        load_kit(kit_dir)


def test_ca_cert_replaced(kit_dir: Path) -> None:
    (kit_dir / CA_CERT_FILE).write_bytes(_ca_pem())
    with pytest.raises(ConfigError, match="not the CA certificate this kit was issued with"):
        load_kit(kit_dir)


@pytest.mark.parametrize("key", ["site", "server", "fingerprint", "ca-fingerprint", "created", "format"])
def test_kit_toml_missing_key(kit_dir: Path, key: str) -> None:
    text = (kit_dir / KIT_FILE).read_text()
    (kit_dir / KIT_FILE).write_text("".join(line + "\n" for line in text.splitlines()
                                            if not line.startswith(f"{key} =")))
    with pytest.raises(ConfigError, match=f"lacks {key}"):
        load_kit(kit_dir)


def test_kit_toml_unparsable(kit_dir: Path) -> None:
    (kit_dir / KIT_FILE).write_text("site = \n")
    with pytest.raises(ConfigError, match="Cannot read .*kit.toml"):
        load_kit(kit_dir)


def test_kit_toml_bad_values(kit_dir: Path) -> None:
    _rewrite_toml(kit_dir, site="../etc")
    with pytest.raises(ConfigError, match="Expected `site`"):
        load_kit(kit_dir)
    _rewrite_toml(kit_dir, site="A", server="nowhere")
    with pytest.raises(ConfigError, match="Expected `server`"):
        load_kit(kit_dir)
    _rewrite_toml(kit_dir, server="coord:1", format="fedrad-kit-0")
    with pytest.raises(ConfigError, match="format"):
        load_kit(kit_dir)


def test_kit_toml_round_trips_any_string() -> None:
    values = dict.fromkeys(KIT_KEYS, "x") | {"fingerprint": 'q"uote \\ back\nslash é', "created": ""}
    assert tomllib.loads(render_kit_toml(values)) == values
    with pytest.raises(ConfigError, match="without site"):
        render_kit_toml({k: v for k, v in values.items() if k != "site"})


# -- the coordinator's data settings ([data]) ------------------------------------------

DEFAULTS = {"image-size": 64, "window": "brain", "multiframe": "slices", "color": "reject", "enhance": "none",
            "classes": "0,1", "val-fraction": 0.25, "seed": 0}


def test_defaults_are_the_pyproject_run_config_defaults() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]["config"]
    assert check_data_settings({}) == DEFAULTS == {key: app[key] for key in DATA_KEYS}


def test_a_kit_with_data_settings_loads_them(tmp_path: Path) -> None:
    kit = load_kit(make_kit(tmp_path / "kit", data={"window": "voi", "image-size": 128, "classes": "a,b,c"}))
    assert kit.data == DEFAULTS | {"window": "voi", "image-size": 128, "classes": "a,b,c"}
    table = tomllib.loads((tmp_path / "kit" / KIT_FILE).read_text())["data"]
    assert list(table) == list(DATA_KEYS) and table["image-size"] == 128


def test_a_kit_without_data_settings_still_loads(kit_dir: Path) -> None:
    assert "[data]" not in (kit_dir / KIT_FILE).read_text()
    assert load_kit(kit_dir).data is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('window = "liver"', r"\[data\]: Expected `window` to be one of brain, .*, but got 'liver'; ask the"),
        ('image-size = "64"', r"\[data\]: Expected `image-size` to be an integer, but got '64'"),
        ("val-fraction = 1.5", r"\[data\]: Expected `val-fraction` to be a number in \(0, 1\], but got 1.5"),
        ('classes = "only"', r"\[data\]: Expected `classes` to be at least two distinct"),
        ("batch-size = 8", r"\[data\]: Expected the keys of the table among image-size, .*, but got batch-size"),
    ],
)
def test_a_bad_data_setting_is_one_line_naming_the_kit(kit_dir: Path, table: str, message: str) -> None:
    with (kit_dir / KIT_FILE).open("a") as f:
        f.write(f"\n[data]\n{table}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_kit(kit_dir)
    assert str(kit_dir / KIT_FILE) in str(err.value) and "\n" not in str(err.value)


def test_a_data_entry_that_is_not_a_table_is_refused(kit_dir: Path) -> None:
    with (kit_dir / KIT_FILE).open("a") as f:
        f.write('data = "voi"\n')
    with pytest.raises(ConfigError, match=r"Expected .*kit.toml \[data\] to be a table of data settings"):
        load_kit(kit_dir)


def test_render_refuses_bad_data_settings() -> None:
    values = dict.fromkeys(KIT_KEYS, "x")
    with pytest.raises(ConfigError, match="Expected `window` to be one of"):
        render_kit_toml(values, data={"window": "liver"})


def test_parse_data_args_keeps_only_what_was_given() -> None:
    assert parse_data_args(['window="voi" image-size=32', "seed=3"]) == {"window": "voi", "image-size": 32, "seed": 3}
    assert parse_data_args(None) == {}
    with pytest.raises(ConfigError, match=r"Expected `--run-config` keys among image-size, .*, but got batch-size"):
        parse_data_args(["batch-size=8"])
    with pytest.raises(ConfigError, match="Expected `image-size` to be an integer in \\[16, 1024\\], but got 8"):
        parse_data_args(["image-size=8"])
    with pytest.raises(ConfigError, match="Expected `-c` as key=value pairs, but got .*No such file"):
        parse_data_args([str(Path("/nonexistent/data.toml"))], option="-c")
