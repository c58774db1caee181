"""User-facing errors.

Every failure that is the user's to fix raises :class:`OnnxlwError`. The CLI prints it as one
line (problem, then fix) and exits with code 2; the Python API lets it propagate.
"""

from __future__ import annotations


class OnnxlwError(Exception):
    """A problem with the input or the options, with the fix the user should apply."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message as printed by the CLI: ``problem; fix``."""
        return f"{self.problem}; {self.fix}" if self.fix else self.problem


class InternalError(Exception):
    """A bug in onnxlw itself (not the user's input): exit code 3 and a request for a report.

    Raised when onnxlw's own output of a stage fails a check (``onnx.checker`` after
    canonicalize or emit, a model that onnxruntime refuses to load).
    """

    exit_code = 3

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message as printed by the CLI."""
        return (
            f"internal error: {self.problem}; this is a bug in onnxlw: please report it with "
            "the output of the same command rerun with -v"
        )
