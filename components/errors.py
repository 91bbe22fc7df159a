"""Error types shared by every step, each mapped to the exit code the CLI promises.

Exit codes (the `kubetune run` contract):
  0  model deployed
  1  anything else went wrong (a bug, the store unreachable, parity failed, ...)
  2  input rejected by validation: nothing was trained or published
  3  the quality gate rejected the model: nothing was published

A step raises one of these; `python -m components.<step>` turns it into the exit code, and the
run record in the store keeps its class and message so the CLI can report it after a pipeline run.
"""

from __future__ import annotations


class KubetuneError(Exception):
    """A failure with a message meant for the user (no traceback needed to understand it)."""

    exit_code = 1
    kind = "error"


class InputError(KubetuneError):
    """Bad input data or arguments: names the file, column/field, row and what to change."""

    exit_code = 2
    kind = "input"


class ConfigError(KubetuneError):
    """Options that cannot work together, rejected before any work is done."""

    exit_code = 1
    kind = "config"


class GateRejected(KubetuneError):
    """The quality gate refused the model. Raised only by the CLI, never inside the pipeline:
    in the pipeline a rejection is a normal outcome that skips export and deploy."""

    exit_code = 3
    kind = "gate"

