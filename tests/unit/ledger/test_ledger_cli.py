"""``fhirbridge ledger keygen|verify`` and ``fhirbridge witness run`` through the real CLI."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from typing import Any

import pytest

from bridge.cli import main
from bridge.stores.ledger import open_ledger
from ledger import checkpoint, note
from ledger.log import LedgerEntry


def entry(i: int) -> LedgerEntry:
    return LedgerEntry(
        hashlib.sha256(b"%d" % i).hexdigest(), "org", "fhir", "1", "t", 0, i, "2024-05-01T00:00:00Z"
    )


def test_keygen_writes_a_usable_key_pair(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "keygen", "--name", "fhirbridge.example/log", "--out", str(tmp_path)]) == 0
    priv = tmp_path / "fhirbridge.example_log.key"
    pub = tmp_path / "fhirbridge.example_log.pub"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    skey, vkey = priv.read_text().strip(), pub.read_text().strip()
    signed = checkpoint.sign("fhirbridge.example/log", 1, b"\x01" * 32, skey)
    assert checkpoint.open(signed, [vkey]).size == 1
    assert vkey in capsys.readouterr().out
    # Refuses to overwrite.
    assert main(["ledger", "keygen", "--name", "fhirbridge.example/log", "--out", str(tmp_path)]) == 1


def test_keygen_witness_key_is_a_cosignature_key(tmp_path: Any) -> None:
    assert main(["ledger", "keygen", "--name", "w.example", "--out", str(tmp_path), "--witness"]) == 0
    assert note.Verifier.from_text((tmp_path / "w.example.pub").read_text().strip()).alg == 0x04


def test_keygen_bad_name_is_a_clean_error(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "keygen", "--name", "a b", "--out", str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err


@pytest.fixture
def signed_log(tmp_path: Any) -> tuple[str, str, str]:
    skey, vkey = note.generate_key("cli.test/log")
    url = f"sqlite:///{tmp_path}/l.db"
    led = open_ledger(url, origin="cli.test/log", signer_key=skey, checkpoint_every=20)
    for s in range(0, 100, 25):
        led.append([entry(i) for i in range(s, s + 25)])
    led.close()
    (tmp_path / "log.pub").write_text(vkey + "\n")
    return url, str(tmp_path / "log.pub"), skey


def test_verify_passes_on_an_intact_log(
    signed_log: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, pub, _ = signed_log
    assert main(["ledger", "verify", "--url", url, "--key", pub]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_reports_first_bad_index_and_exits_1(
    signed_log: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, pub, _ = signed_log
    conn = sqlite3.connect(url[len("sqlite://") :])
    with conn:
        conn.execute("UPDATE ledger_entries SET entry = ? WHERE idx = 57", (entry(1000).canonical(),))
    conn.close()
    assert main(["ledger", "verify", "--url", url, "--key", pub]) == 1
    assert "first bad index 57" in capsys.readouterr().out


def test_verify_from_checkpoint(signed_log: tuple[str, str, str], tmp_path: Any) -> None:
    url, pub, skey = signed_log
    led = open_ledger(url, origin="cli.test/log")
    good = tmp_path / "kept.txt"
    good.write_text(checkpoint.sign("cli.test/log", 30, led.root_hash(30), skey))
    bad = tmp_path / "other.txt"
    bad.write_text(checkpoint.sign("cli.test/log", 30, b"\x00" * 32, skey))
    led.close()
    assert main(["ledger", "verify", "--url", url, "--key", pub, "--from-checkpoint", str(good)]) == 0
    assert main(["ledger", "verify", "--url", url, "--key", pub, "--from-checkpoint", str(bad)]) == 1


def test_verify_usage_errors_are_clean(
    signed_log: tuple[str, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _, _ = signed_log
    os.environ.pop("FHIRBRIDGE_LEDGER_PUBLIC_KEY", None)
    assert main(["ledger", "verify", "--url", url]) == 1
    assert main(["ledger", "verify", "--url", "nope://x", "--key", "k+00000000+AAAA"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


def test_witness_run_once_against_an_unreachable_log_fails_cleanly(tmp_path: Any) -> None:
    _, vkey = note.generate_key("cli.test/log")
    wskey, _ = note.generate_key("w.test", note.ALG_COSIGNATURE_V1)
    (tmp_path / "w.key").write_text(wskey + "\n")
    argv = [
        "witness",
        "run",
        "--log-url",
        "http://127.0.0.1:9",
        "--log-key",
        vkey,
        "--key",
        str(tmp_path / "w.key"),
    ]
    assert main([*argv, "--state", str(tmp_path / "state"), "--once"]) == 1
