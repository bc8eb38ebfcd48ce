"""User errors and the one way every command reports them.

A `UserError` is a mistake in what the user handed us: a config value, a recipe, a data
root, a checkpoint, an output path. Commands print it as ONE line naming the key, file or
value and what is allowed, and exit with status 2; no traceback. Anything else is a bug
and keeps its traceback. `SCALE_DEBUG=1` prints the traceback of user errors too.

Exit statuses of `scale-train`, which the SLURM launcher (slurm/launch.sh) acts on:
0 finished; 1 a bug (traceback); 2 a user error; 3 preempted (SIGUSR1/SIGTERM: checkpoint
written, requeue and `--resume auto`); 4 hung (the watchdog found no step completing on a
rank, scale/trainer/watchdog.py: requeue and resume, like preemption); 5 diverged (a
non-finite loss or grad norm, scale/trainer/divergence.py: not requeued, the run needs a look).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn

USER_ERROR_EXIT = 2
PREEMPTED_EXIT = 3
HANG_EXIT = 4
DIVERGED_EXIT = 5
DEBUG_ENV = "SCALE_DEBUG"


class UserError(Exception):
    """Bad input from the user (config, file, checkpoint); reported as one line, exit 2."""


class ConfigError(UserError, ValueError):
    """A recipe or override that does not match the config schema (also `scale.config.ConfigError`)."""


class Diverged(Exception):
    """Training went non-finite and cannot continue (train.on_nonfinite: stop, or rollbacks used up).
    Every rank raises it together; its message is the one line `run_command` prints where `report`
    (the main rank), and the command exits with DIVERGED_EXIT."""

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report


def one_line(err: BaseException) -> str:
    """The message of `err` folded onto one line."""
    text = str(err)
    if "Original Traceback" in text:
        # Raised in a DataLoader worker: torch re-raises it with the worker's traceback as the
        # message, whose last line is the original "ClassName: message".
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(err).__name__


def report_user_error(prog: str, err: BaseException) -> int:
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(err)
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT


class CommandParser(argparse.ArgumentParser):
    """argparse for scale's commands: a usage mistake (an unknown flag, a bad value) is a user error
    like any other, ONE line `PROG: error: ...` and exit 2, without argparse's usage block before it
    (`--help` still prints the usage)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR_EXIT)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body; a UserError becomes one line on stderr and exit status 2, a divergence
    (Diverged, from any command that trains) one line from the main rank and exit status 5."""
    try:
        return body()
    except UserError as err:
        return report_user_error(prog, err)
    except Diverged as err:
        if err.report:
            print(f"{prog}: {one_line(err)}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT
