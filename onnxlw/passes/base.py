"""What every graph pass returns: a new model plus notes on each rule, fired or not."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx


@dataclass(frozen=True)
class Note:
    """One rule application: where, whether it fired, and why (not)."""

    pass_name: str
    rule: str
    where: str
    fired: bool
    reason: str = ""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return asdict(self)


@dataclass
class PassResult:
    """A pass's output. ``model`` is a new ModelProto; the input model is left untouched."""

    model: onnx.ModelProto
    notes: list[Note] = field(default_factory=list)
