from __future__ import annotations

from pathlib import Path

from clusterctl.swap import ledger as ledgers
from clusterctl.swap.ledger import Ledger, LedgerFile


def test_round_trip(tmp_path: Path) -> None:
    ledger = Ledger((LedgerFile("swap-0001", 2**30, 1.5, "fallocate", "boot"),), 3.0, None)
    ledgers.save(tmp_path, ledger)
    assert ledgers.load(tmp_path) == ledger
    assert (tmp_path / "swap.json").stat().st_mode & 0o777 == 0o600


def test_absent_ledger_is_empty(tmp_path: Path) -> None:
    assert ledgers.load(tmp_path) == Ledger()


def test_a_corrupt_ledger_is_set_aside_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "swap.json").write_text("{not json")
    assert ledgers.load(tmp_path) == Ledger()
    (aside,) = tmp_path.glob("swap.json.corrupt-*")
    assert aside.read_text() == "{not json"


def test_next_name_fills_the_lowest_gap() -> None:
    ledger = Ledger((LedgerFile("swap-0001", 1, 0, "x"), LedgerFile("swap-0003", 1, 0, "x")))
    assert ledger.next_name() == "swap-0002"
    assert ledger.next_name({"swap-0002"}) == "swap-0004"
