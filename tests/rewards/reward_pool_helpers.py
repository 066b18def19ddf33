"""Module-level reward functions for the pool tests (picklable by reference, so worker
processes can import them; this directory is on the workers' PYTHONPATH)."""

import os
import signal
import threading
import time


def index_reward(completion, problem):
    """Returns the integer in the completion (lets tests check result order)."""
    return float(int(completion))


def raising_reward(completion, problem):
    if completion == "boom":
        raise RuntimeError("boom requested")
    return 1.0


def looping_reward(completion, problem):
    """A Python-level infinite loop for 'spin' (SIGALRM interrupts it)."""
    if completion == "spin":
        while True:
            pass
    return 1.0


def stubborn_reward(completion, problem):
    """Blocks SIGALRM and sleeps for 'hang': only the parent's watchdog can stop it."""
    if completion == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    return 1.0


def dying_reward(completion, problem):
    if completion == "die":
        os._exit(3)
    return 1.0


def nan_reward(completion, problem):
    return float("nan") if completion == "nan" else 0.5


def pid_reward(completion, problem):
    return float(os.getpid())


def delayed_exit_reward(completion, problem):
    """For 'later', ends the process from a background thread shortly after returning."""
    if completion == "later":
        threading.Timer(0.2, os._exit, (4,)).start()
    return 1.0
