"""Error types shared by every step, and the one exit-code table of kubetune.

  0  model deployed, or training skipped because the data is unchanged
  1  anything else went wrong (a bug, the store unreachable, ONNX parity failed, a disk full, ...)
  2  input or options rejected: nothing was trained or published
  3  the quality gate rejected the model (or a variant the user required failed its check): nothing published
130  `kubetune run` cancelled by SIGINT (Ctrl-C), 143 by SIGTERM: its steps were stopped, the summary says `cancelled`

A step raises one of these; wherever it is caught (`kubetune ...`, `python -m kubetune.steps.<step>`,
or inside a pipeline task, whose run record keeps the error's kind and exit code) it means the same
exit code, and the run summary's `exit_code` is the process exit code of `kubetune run`.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_GATE = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal's number, as a shell reports it
# run outcome -> exit code (the run summary and `kubetune run`)
OUTCOMES = {"deployed": EXIT_OK, "skipped": EXIT_OK, "failed": EXIT_FAILED, "input_rejected": EXIT_INPUT, "gate_rejected": EXIT_GATE,
            "cancelled": EXIT_SIGTERM}  # 130 when the signal was SIGINT (the summary keeps the real one)


class KubetuneError(Exception):
    """A failure with a message meant for the user (no traceback needed to understand it)."""

    exit_code = EXIT_FAILED
    kind = "error"


class InputError(KubetuneError):
    """Bad input data or arguments: names the file, column/field, row and what to change."""

    exit_code = EXIT_INPUT
    kind = "input"


class ConfigError(InputError):
    """Options that cannot work together, rejected before any work is done (exit 2, like bad input)."""

    kind = "config"


class DiskFullError(KubetuneError):
    """No space left where a step writes (a checkpoint, a model, an ONNX graph, token shards): names the
    folder, what was being written and its size (kubetune.storage.space raises it). Exit 1."""

    kind = "disk_full"


class GateRejected(KubetuneError):
    """The quality gate refused the model (`python -m kubetune.steps.evaluate` raises it). Inside the
    pipeline a rejection is a normal outcome that skips export and deploy; the run exits 3."""

    exit_code = EXIT_GATE
    kind = "gate"


class Cancelled(KubetuneError):
    """`kubetune run` stopped by SIGTERM or SIGINT: its step processes were stopped, nothing more runs."""

    kind = "cancelled"

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        super().__init__(f"cancelled by {signal.Signals(signum).name}: the run's steps were stopped")


def exit_code_of(error: BaseException) -> int:
    return getattr(error, "exit_code", EXIT_FAILED)


def outcome_of(exit_code: int) -> str:
    """The run outcome a failed step's exit code stands for."""
    return {EXIT_INPUT: "input_rejected", EXIT_GATE: "gate_rejected"}.get(exit_code, "failed")
