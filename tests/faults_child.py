"""`lmadapt` run as a user would, with one fault injected: `python -m tests.faults_child FAULT N
-- train CONFIG`. Used by tests/test_faults.py, which checks what the user then sees and keeps.

Faults:
- `sigint N`: a real SIGINT (Ctrl-C) in the middle of optimizer step N + 1.
- `sigkill N`: SIGKILL in the middle of step N + 1.
- `sigkill-save N`: SIGKILL halfway through writing the N-th safetensors file of the run.
- `enospc N`: the N-th safetensors file written fails with ENOSPC (disk full).
- `eacces N`: the N-th safetensors file written fails with EACCES (its directory was made
  unwritable; as root, permissions cannot be taken away, so the error is injected).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

from lmadapt.cli import main
from lmadapt.train import checkpoint, loop


class _SignalAt(loop.Hook):
    def __init__(self, step: int, sig: int):
        self.step, self.sig = step, sig

    def on_train_start(self, trainer: loop.Trainer) -> None:
        self.trainer = trainer

    def loss_term(self, model, batch, outputs):  # between the forward and the backward pass
        if self.trainer.state.step == self.step:
            self.step = -1
            os.kill(os.getpid(), self.sig)
        return None


def _with_hook(hook: loop.Hook) -> None:
    fit = loop.Trainer.fit

    def fit_with_fault(self: loop.Trainer, resume: bool = False) -> loop.TrainResult:
        self.hooks.append(hook)
        return fit(self, resume)

    loop.Trainer.fit = fit_with_fault


def _on_nth_save(n: int, fail: object) -> None:
    save = checkpoint.save_file
    calls = {"n": 0}

    def faulty_save(tensors: dict, filename: str, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            fail(tensors, filename)
        save(tensors, filename, *args, **kwargs)

    checkpoint.save_file = faulty_save


def _half_write_then_die(tensors: dict, filename: str) -> None:
    Path(filename).write_bytes(b"\0" * 1024)  # a torn file, as the kernel may leave one
    os.kill(os.getpid(), signal.SIGKILL)


def _disk_full(tensors: dict, filename: str) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


def _unwritable(tensors: dict, filename: str) -> None:
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), filename)


FAULTS = {
    "sigint": lambda n: _with_hook(_SignalAt(n, signal.SIGINT)),
    "sigkill": lambda n: _with_hook(_SignalAt(n, signal.SIGKILL)),
    "sigkill-save": lambda n: _on_nth_save(n, _half_write_then_die),
    "enospc": lambda n: _on_nth_save(n, _disk_full),
    "eacces": lambda n: _on_nth_save(n, _unwritable),
}


if __name__ == "__main__":
    fault, n, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: python -m tests.faults_child FAULT N -- ARGS..."
    FAULTS[fault](int(n))
    sys.exit(main(argv))
