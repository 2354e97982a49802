"""The adapters: the installed Flower/Opacus must be the tested ones, and the wrappers keep Flower's meaning."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from common.adapters import flower, opacus
from common.adapters.version import require_version
from common.errors import ConfigError, IncompatibleVersion


def test_the_installed_libraries_are_the_tested_ones() -> None:
    assert version("flwr") == flower.TESTED_VERSION and version("opacus") == opacus.TESTED_VERSION
    assert require_version("flwr", flower.TESTED_VERSION, install="flwr[simulation]") == flower.TESTED_VERSION


def test_another_version_is_one_line_saying_what_to_install() -> None:
    with pytest.raises(IncompatibleVersion, match=r"Expected flwr 9\.9\.9 .*got 1\.41\.0; run `pip install 'flwr\[simulation\]==9\.9\.9'`"):
        require_version("flwr", "9.9.9", install="flwr[simulation]")
    with pytest.raises(ConfigError, match="not installed; run `pip install 'no-such-dist==1.0'`"):
        require_version("no-such-dist", "1.0", install="no-such-dist")


def test_delivery_errors_keep_flowers_codes() -> None:
    from flwr.common.constant import ErrorCode

    assert flower.undelivered(ErrorCode.MESSAGE_UNAVAILABLE) == flower.undelivered(ErrorCode.REPLY_MESSAGE_UNAVAILABLE) == "expired"
    assert flower.undelivered(ErrorCode.NODE_UNAVAILABLE) == "node unavailable"
    assert flower.undelivered(ErrorCode.CLIENT_APP_RAISED_EXCEPTION) is None


def test_secaggplus_messages_are_told_apart_by_their_stage() -> None:
    assert flower.secaggplus_stage(RecordDict({"secaggplus_configs": ConfigRecord({"stage": "setup"})})) == "setup"
    assert flower.secaggplus_stage(RecordDict({"config": ConfigRecord({"stage": "setup"})})) is None


def test_a_fit_reply_carries_the_arrays_and_the_weight() -> None:
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    arrays = [np.ones((2, 2), np.float32), np.zeros(1, np.float32)]
    fitres = recorddict_to_fitres(flower.fit_reply(arrays, num_examples=7, metrics={"m": 1.0}), keep_input=True)
    assert fitres.num_examples == 7 and fitres.metrics == {"m": 1.0}


def test_the_rdp_memo_is_undone_on_exit() -> None:
    from opacus.accountants.analysis import rdp

    original = rdp._compute_rdp
    with opacus.memoized_rdp(), opacus.memoized_rdp():
        assert rdp._compute_rdp is not original
    assert rdp._compute_rdp is original
