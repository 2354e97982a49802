"""The consortium PKI and enrollment: CA once, server certificate by host names, kits, registry, crashes."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError
from common.kit import KIT_FILES, PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, check_data_settings, load_kit, ssh_fingerprint
from server.enroll import Consortium, Rekeyed

ADDRESS = "coord.example.org:9092"


@pytest.fixture
def consortium(tmp_path: Path) -> Consortium:
    return Consortium(tmp_path / "coordinator")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ({str(ip) for ip in ext.get_values_for_type(x509.IPAddress)},
            set(ext.get_values_for_type(x509.DNSName)))


def _stray_temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]


# -- CA ---------------------------------------------------------------------------


def test_ca_is_created_once_and_reused(consortium: Consortium) -> None:
    ca_path = consortium.ensure_ca()
    assert ca_path == consortium.workdir / "pki" / "ca.crt"
    key_path = consortium.workdir / "pki" / "ca.key"
    assert _mode(key_path) == 0o600
    first_cert, first_key = ca_path.read_bytes(), key_path.read_bytes()

    assert consortium.ensure_ca() == ca_path
    assert Consortium(consortium.workdir).ensure_ca() == ca_path
    assert (ca_path.read_bytes(), key_path.read_bytes()) == (first_cert, first_key)


def test_ca_certificate(consortium: Consortium) -> None:
    cert = _cert(consortium.ensure_ca())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fedrad consortium CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 3649 <= days <= 3651
    key = serialization.load_pem_private_key((consortium.workdir / "pki" / "ca.key").read_bytes(), None)
    assert key.public_key() == cert.public_key()


def test_ca_key_without_certificate_is_certified(consortium: Consortium) -> None:
    """A crash between writing the CA key and its certificate: the next call certifies that key."""
    ca_path = consortium.ensure_ca()
    key_before = (consortium.workdir / "pki" / "ca.key").read_bytes()
    ca_path.unlink()
    _cert(consortium.ensure_ca())
    assert (consortium.workdir / "pki" / "ca.key").read_bytes() == key_before


def test_ca_certificate_without_key_is_refused(consortium: Consortium) -> None:
    consortium.ensure_ca()
    (consortium.workdir / "pki" / "ca.key").unlink()
    with pytest.raises(ConfigError, match="has no key"):
        consortium.ensure_ca()


def test_readable_ca_key_is_refused(consortium: Consortium) -> None:
    consortium.ensure_ca()
    (consortium.workdir / "pki" / "ca.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        consortium.ensure_ca()


# -- server certificate -------------------------------------------------------------


def test_server_cert_names_loopback_and_extra_hosts(consortium: Consortium) -> None:
    cert_path, key_path = consortium.ensure_server_cert(["coord.example.org", "10.1.2.3", "::1"])
    assert _mode(key_path) == 0o600
    cert = _cert(cert_path)
    ips, dns = _sans(cert)
    assert ips == {"127.0.0.1", "10.1.2.3", "::1"}
    assert dns == {"localhost", "coord.example.org"}
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in ext.get_values_for_type(x509.IPAddress)

    ca = _cert(consortium.ensure_ca())
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 729 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 731
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key() == cert.public_key()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_server_cert_verifies_with_openssl(consortium: Consortium) -> None:
    cert_path, _ = consortium.ensure_server_cert(["coord.example.org"])
    result = subprocess.run(
        ["openssl", "verify", "-purpose", "sslserver", "-CAfile", str(consortium.ensure_ca()), str(cert_path)],
        check=False, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_server_cert_reused_for_same_hosts(consortium: Consortium) -> None:
    cert_path, key_path = consortium.ensure_server_cert(["b.example.org", "a.example.org"])
    before = (cert_path.read_bytes(), key_path.read_bytes())
    consortium.ensure_server_cert(["a.example.org", "b.example.org", "localhost", "127.0.0.1"])
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_server_cert_reissued_when_hosts_change(consortium: Consortium) -> None:
    cert_path, _ = consortium.ensure_server_cert(["a.example.org"])
    before = cert_path.read_bytes()
    consortium.ensure_server_cert(["a.example.org", "192.168.0.7"])
    assert cert_path.read_bytes() != before
    cert = _cert(cert_path)
    assert _sans(cert) == ({"127.0.0.1", "192.168.0.7"}, {"localhost", "a.example.org"})
    cert.verify_directly_issued_by(_cert(consortium.ensure_ca()))

    consortium.ensure_server_cert([])
    assert _sans(_cert(cert_path)) == ({"127.0.0.1"}, {"localhost"})


def test_server_cert_reissued_when_key_does_not_match(consortium: Consortium) -> None:
    """A crash between writing a new server key and its certificate is repaired by the next call."""
    cert_path, key_path = consortium.ensure_server_cert([])
    other = ec.generate_private_key(ec.SECP384R1())
    key_path.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    consortium.ensure_server_cert([])
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key() == _cert(cert_path).public_key()


@pytest.mark.parametrize("host", ["bad host", "-x.org", "a..b", "x" * 300])
def test_server_cert_rejects_bad_hosts(consortium: Consortium, host: str) -> None:
    with pytest.raises(ConfigError, match="host name or IP address"):
        consortium.ensure_server_cert([host])


# -- enrollment ---------------------------------------------------------------------


def test_enroll_writes_a_kit_load_kit_accepts(consortium: Consortium) -> None:
    kit_dir = consortium.enroll("A", server_address=ADDRESS)
    assert kit_dir == consortium.workdir / "kits" / "A"
    assert sorted(p.name for p in kit_dir.iterdir()) == sorted(KIT_FILES)

    kit = load_kit(kit_dir)
    assert (kit.site, kit.server) == ("A", ADDRESS)
    assert _mode(kit.private_key) == 0o600
    assert kit.ca_cert.read_bytes() == consortium.ensure_ca().read_bytes()

    key = serialization.load_ssh_private_key(kit.private_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP384R1)
    public_line = kit.public_key.read_text().strip()
    expected = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public_line.split()[:2] == expected.decode().split()
    assert serialization.load_ssh_public_key(public_line.encode()) == key.public_key()

    entry = consortium.sites()["A"]
    assert entry["public_key"] == public_line
    assert entry["fingerprint"] == kit.fingerprint == ssh_fingerprint(public_line)
    assert entry["kit"] == str(kit_dir)
    assert entry["enrolled"].startswith("20")
    registry = json.loads((consortium.workdir / "pki" / "sites.json").read_text())
    assert registry == {"A": entry}


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_site_key_reads_like_ssh_keygen_keys(consortium: Consortium) -> None:
    kit_dir = consortium.enroll("A", server_address=ADDRESS)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(kit_dir / PRIVATE_KEY_FILE)], check=True,
                             capture_output=True, text=True).stdout
    assert derived.split()[:2] == (kit_dir / PUBLIC_KEY_FILE).read_text().split()[:2]
    listed = subprocess.run(["ssh-keygen", "-lf", str(kit_dir / PUBLIC_KEY_FILE)], check=True,
                            capture_output=True, text=True).stdout.split()
    assert listed[0] == "384" and listed[-1] == "(ECDSA)"
    assert listed[1] == consortium.sites()["A"]["fingerprint"]


def test_kit_archive_holds_the_kit(consortium: Consortium, tmp_path: Path) -> None:
    kit_dir = consortium.enroll("A", server_address=ADDRESS)
    archive = consortium.workdir / "kits" / "A.tar.gz"
    assert _mode(archive) == 0o600
    with tarfile.open(archive) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
        assert names == {f"A/{name}" for name in KIT_FILES}
        assert stat.S_IMODE(tar.getmember(f"A/{PRIVATE_KEY_FILE}").mode) == 0o600
        tar.extractall(tmp_path / "site", filter="data")
    for name in KIT_FILES:
        assert (tmp_path / "site" / "A" / name).read_bytes() == (kit_dir / name).read_bytes()
    assert load_kit(tmp_path / "site" / "A").fingerprint == load_kit(kit_dir).fingerprint


def test_double_enroll_is_refused(consortium: Consortium) -> None:
    kit_dir = consortium.enroll("A", server_address=ADDRESS)
    before = (kit_dir / PRIVATE_KEY_FILE).read_bytes()
    with pytest.raises(ConfigError, match=r"already enrolled.*fl-server rekey --site A"):
        consortium.enroll("A", server_address=ADDRESS)
    assert (kit_dir / PRIVATE_KEY_FILE).read_bytes() == before


def test_sites_get_distinct_keys(consortium: Consortium) -> None:
    consortium.enroll("A", server_address=ADDRESS)
    consortium.enroll("site_b-2", server_address="10.0.0.1:9092")
    sites = consortium.sites()
    assert set(sites) == {"A", "site_b-2"}
    assert sites["A"]["fingerprint"] != sites["site_b-2"]["fingerprint"]
    assert load_kit(Path(sites["site_b-2"]["kit"])).server == "10.0.0.1:9092"


@pytest.mark.parametrize("site", ["", "../A", "a b", "A/B", "x" * 65])
def test_bad_site_names_are_refused(consortium: Consortium, site: str) -> None:
    with pytest.raises(ConfigError, match="Expected `site`"):
        consortium.enroll(site, server_address=ADDRESS)
    assert not (consortium.workdir / "kits").exists() or not any((consortium.workdir / "kits").iterdir())


@pytest.mark.parametrize("address", ["coord", "coord:0", "coord:99999", ""])
def test_bad_server_address_is_refused(consortium: Consortium, address: str) -> None:
    with pytest.raises(ConfigError, match="server-address"):
        consortium.enroll("A", server_address=address)
    assert consortium.sites() == {}


def test_rekey_changes_key_and_fingerprint(consortium: Consortium) -> None:
    kit_dir = consortium.enroll("A", server_address=ADDRESS)
    old = consortium.sites()["A"]
    result = consortium.rekey("A", server_address="new.example.org:9093")
    assert isinstance(result, Rekeyed)
    assert result.kit == kit_dir
    assert result.old_public_key == old["public_key"]
    assert result.old_fingerprint == old["fingerprint"]

    kit = load_kit(kit_dir)
    new = consortium.sites()["A"]
    assert kit.fingerprint == new["fingerprint"] != old["fingerprint"]
    assert new["public_key"] != old["public_key"]
    assert kit.server == "new.example.org:9093"
    assert _mode(kit.private_key) == 0o600
    with tarfile.open(consortium.workdir / "kits" / "A.tar.gz") as tar:
        member = tar.extractfile(f"A/{PUBLIC_KEY_FILE}")
        assert member is not None and member.read().decode().strip() == new["public_key"]
    assert _stray_temp_files(consortium.workdir) == []


def test_rekey_of_unknown_site_is_refused(consortium: Consortium) -> None:
    with pytest.raises(ConfigError, match=r"not enrolled.*fl-server enroll --site A"):
        consortium.rekey("A", server_address=ADDRESS)


def test_remove_deletes_kit_and_registry_entry(consortium: Consortium) -> None:
    consortium.enroll("A", server_address=ADDRESS)
    kit_b = consortium.enroll("B", server_address=ADDRESS)
    public = consortium.sites()["A"]["public_key"]

    assert consortium.remove("A") == public
    assert set(consortium.sites()) == {"B"}
    assert not (consortium.workdir / "kits" / "A").exists()
    assert not (consortium.workdir / "kits" / "A.tar.gz").exists()
    load_kit(kit_b)
    with pytest.raises(ConfigError, match="not enrolled"):
        consortium.remove("A")
    consortium.enroll("A", server_address=ADDRESS)  # and it can be enrolled afresh
    assert set(consortium.sites()) == {"A", "B"}


# -- the consortium's data settings, carried by every kit -------------------------------


def test_a_kit_carries_the_run_config_defaults_unless_told(consortium: Consortium) -> None:
    kit = load_kit(consortium.enroll("A", server_address=ADDRESS))
    assert kit.data == check_data_settings({}) == consortium.data_settings()
    assert kit.data["image-size"] == 64 and kit.data["window"] == "brain"
    assert not (consortium.workdir / "pki" / "data.toml").exists()


def test_data_settings_given_at_enrollment_go_into_every_later_kit(consortium: Consortium) -> None:
    voi = {"window": "voi", "image-size": 128}
    kit_a = consortium.enroll("A", server_address=ADDRESS, data=voi)
    expected = check_data_settings(voi)
    assert load_kit(kit_a).data == expected == consortium.data_settings()
    assert Consortium(consortium.workdir).data_settings() == expected  # recorded, not remembered
    assert load_kit(consortium.enroll("B", server_address=ADDRESS)).data == expected
    assert load_kit(consortium.rekey("A", server_address=ADDRESS).kit).data == expected


def test_changed_data_settings_apply_over_the_old_and_name_the_stale_kits(
    consortium: Consortium, caplog: pytest.LogCaptureFixture
) -> None:
    consortium.enroll("A", server_address=ADDRESS, data={"window": "voi"})
    consortium.enroll("B", server_address=ADDRESS)
    with caplog.at_level(logging.WARNING, logger="server.enroll"):
        kit_c = consortium.enroll("C", server_address=ADDRESS, data={"image-size": 32})
    assert load_kit(kit_c).data == check_data_settings({"window": "voi", "image-size": 32})
    assert "the kits of A, B carry the old ones" in caplog.text and "-c 'image-size=32'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.enroll"):
        consortium.rekey("C", server_address=ADDRESS, data={"image-size": 32})  # no change: no warning
    assert caplog.text == ""


@pytest.mark.parametrize(("data", "message"), [
    ({"window": "liver"}, "Expected `window` to be one of"),
    ({"batch-size": 8}, "Expected the keys of data settings among image-size, .*, but got batch-size"),
])
def test_bad_data_settings_are_refused_before_anything_is_written(
    consortium: Consortium, data: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        consortium.enroll("A", server_address=ADDRESS, data=data)
    assert consortium.sites() == {} and not (consortium.workdir / "kits" / "A").exists()
    assert not (consortium.workdir / "pki" / "data.toml").exists()


def test_corrupt_data_settings_are_reported(consortium: Consortium) -> None:
    consortium.enroll("A", server_address=ADDRESS, data={"window": "voi"})
    data_file = consortium.workdir / "pki" / "data.toml"
    data_file.write_text('window = "liver"\n')
    with pytest.raises(ConfigError, match=r"data.toml: Expected `window` to be one of .*; restore it from backup"):
        consortium.enroll("B", server_address=ADDRESS)
    data_file.write_text("window = \n")
    with pytest.raises(ConfigError, match="Cannot read the data settings .*data.toml"):
        consortium.data_settings()


# -- crashes --------------------------------------------------------------------------


def test_registry_survives_a_crash_mid_write(consortium: Consortium, monkeypatch: pytest.MonkeyPatch) -> None:
    consortium.enroll("A", server_address=ADDRESS)
    registry = consortium.workdir / "pki" / "sites.json"
    before = registry.read_bytes()
    real_replace = os.replace

    def crash_on_registry(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == registry:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_registry)
    with pytest.raises(OSError, match="disk full"):
        consortium.enroll("B", server_address=ADDRESS)
    assert registry.read_bytes() == before
    assert set(consortium.sites()) == {"A"}
    assert _stray_temp_files(consortium.workdir) == []

    # The unregistered kit left behind is replaced by the next enrollment.
    monkeypatch.setattr(os, "replace", real_replace)
    kit_b = consortium.enroll("B", server_address=ADDRESS)
    assert load_kit(kit_b).fingerprint == consortium.sites()["B"]["fingerprint"]


def test_no_half_written_files_when_every_rename_fails(
    consortium: Consortium, monkeypatch: pytest.MonkeyPatch
) -> None:
    consortium.enroll("A", server_address=ADDRESS)
    snapshot = {p: p.read_bytes() for p in consortium.workdir.rglob("*") if p.is_file()}

    def crash(src: str | Path, dst: str | Path) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        consortium.enroll("B", server_address=ADDRESS)
    with pytest.raises(OSError, match="power cut"):
        consortium.rekey("A", server_address=ADDRESS)
    assert {p: p.read_bytes() for p in consortium.workdir.rglob("*") if p.is_file()} == snapshot
    assert _stray_temp_files(consortium.workdir) == []
    monkeypatch.undo()
    load_kit(consortium.workdir / "kits" / "A")


def test_failed_kit_swap_keeps_the_old_kit(consortium: Consortium, monkeypatch: pytest.MonkeyPatch) -> None:
    kit_dir = consortium.enroll("A", server_address=ADDRESS)
    fingerprint = load_kit(kit_dir).fingerprint
    real_replace = os.replace

    def crash_on_swap(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == kit_dir and Path(src).name.endswith(".tmp"):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_swap)
    with pytest.raises(OSError, match="power cut"):
        consortium.rekey("A", server_address=ADDRESS)
    monkeypatch.undo()
    assert load_kit(kit_dir).fingerprint == fingerprint == consortium.sites()["A"]["fingerprint"]
    assert _stray_temp_files(consortium.workdir) == []


def test_leftovers_of_a_crash_are_cleaned_up(consortium: Consortium) -> None:
    consortium.enroll("A", server_address=ADDRESS)
    kits = consortium.workdir / "kits"
    (kits / ".A.12345.old").mkdir()
    (kits / ".A.12345.old" / PRIVATE_KEY_FILE).write_text("old key")
    (kits / ".A.tar.gz.abc.tmp").write_text("half an archive")
    consortium.rekey("A", server_address=ADDRESS)
    assert _stray_temp_files(consortium.workdir) == []


def test_corrupt_registry_is_reported(consortium: Consortium) -> None:
    consortium.enroll("A", server_address=ADDRESS)
    (consortium.workdir / "pki" / "sites.json").write_text("{not json")
    with pytest.raises(ConfigError, match="Cannot read the site registry"):
        consortium.sites()
    with pytest.raises(ConfigError, match="restore it from backup"):
        consortium.enroll("B", server_address=ADDRESS)
