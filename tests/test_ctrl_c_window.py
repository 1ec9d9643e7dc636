"""Ctrl-C while the local launcher submits a stage (CI, test_ctrl_c_says_the_truth...: exit 1 instead
of 130, once): the launcher ignores SIGINT around the submit so the controller inherits that, and a
Ctrl-C in that window used to be discarded; now it is held pending and raised right after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lxmert_bench.launch import _sigint_ignored
from lxmert_bench.train.stages import signals_interrupt

SHOW = ("import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, "
        "signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))")


def test_a_ctrl_c_during_the_submit_reaches_the_launcher_after_it():
    with pytest.raises(KeyboardInterrupt):
        with _sigint_ignored(True):
            child = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True)
            os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C, mid-submit
            inside = True  # not raised here: the controller being started must not die
        inside = False
    assert inside
    # the controller started in the window inherits SIGINT ignored (and blocked)
    assert child.stdout.split() == ["True", "True"], child.stdout + child.stderr
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_stage_unblocks_the_signals_it_records():
    code = ("import os, signal\n"
            "from lxmert_bench.train.stages import StageInterrupted, signals_interrupt\n"
            "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
            "try:\n"
            "    with signals_interrupt():\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        print('not interrupted')\n"
            "except StageInterrupted:\n"
            "    print('interrupted')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "interrupted", out.stdout + out.stderr
    assert signals_interrupt  # the context manager the stages run under
