from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from clusterctl import log


@pytest.fixture(autouse=True)
def _restore_root_logger():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def journal_env(path: Path) -> dict[str, str]:
    st = path.stat()
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_under_journald_lines_carry_syslog_priorities(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        log.setup(0, stream=stream, env=journal_env(path))
        logger = logging.getLogger("clusterctl.test")
        logger.error("swap file refused")
        logger.warning("disk almost full")
        logger.info("grew swap\nby 1G")
        logger.debug("not shown at default verbosity")
    assert path.read_text().splitlines() == [
        "<3>swap file refused",
        "<4>disk almost full",
        "<6>grew swap",
        "<6>by 1G",
    ]


def test_a_stale_journal_stream_is_ignored(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited by a child whose stderr goes elsewhere."""
    other = tmp_path / "other"
    other.write_text("")
    stream = io.StringIO()
    log.setup(0, stream=stream, env=journal_env(other))
    logging.getLogger("clusterctl").warning("careful")
    assert stream.getvalue() == "clusterctl: warning: careful\n"


def test_at_a_terminal_info_is_hidden_unless_verbose() -> None:
    stream = io.StringIO()
    log.setup(0, stream=stream, env={})
    logging.getLogger("clusterctl").info("hidden")
    log.setup(1, stream=stream, env={})
    logging.getLogger("clusterctl").info("shown")
    assert stream.getvalue() == "clusterctl: shown\n"


def test_quiet_shows_only_errors() -> None:
    stream = io.StringIO()
    log.setup(-1, stream=stream, env={})
    logging.getLogger("clusterctl").warning("hidden")
    logging.getLogger("clusterctl").error("shown")
    assert stream.getvalue() == "clusterctl: error: shown\n"
