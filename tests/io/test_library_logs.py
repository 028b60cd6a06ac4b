from __future__ import annotations

import logging
import threading
import warnings

import pytest

from pipelines.io.library_logs import LIBRARY_LOGGERS, library_logs_as_warnings


@pytest.mark.parametrize("name", ["pydicom", "highdicom.seg.sop", "nibabel.global"])
def test_logged_warnings_become_warnings_and_reach_no_handler(name, caplog):
    with caplog.at_level(logging.DEBUG, logger=name), warnings.catch_warnings(record=True) as caught, \
            library_logs_as_warnings():
        warnings.simplefilter("always")
        logging.getLogger(name).warning("/media/DOE_JANE/IM1: does not exist")
        logging.getLogger(name).info("read 3 files")
    assert [str(w.message) for w in caught] == ["/media/DOE_JANE/IM1: does not exist"]
    assert [r.getMessage() for r in caplog.records] == ["read 3 files"]  # below WARNING: handled as before


def test_nested_and_threaded_uses_restore_the_loggers_when_the_last_leaves(caplog):
    before = {name: (logging.getLogger(name).propagate, list(logging.getLogger(name).handlers))
              for name in LIBRARY_LOGGERS}
    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with library_logs_as_warnings():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    entered.wait(10)
    with library_logs_as_warnings(), library_logs_as_warnings():
        pass
    with warnings.catch_warnings(record=True) as caught:  # the thread still holds it
        warnings.simplefilter("always")
        logging.getLogger("pydicom").warning("still caught")
    leave.set()
    thread.join(10)
    assert [str(w.message) for w in caught] == ["still caught"]
    after = {name: (logging.getLogger(name).propagate, list(logging.getLogger(name).handlers))
             for name in LIBRARY_LOGGERS}
    assert after == before
    with caplog.at_level(logging.WARNING):
        logging.getLogger("pydicom").warning("logged again")
    assert "logged again" in caplog.text
