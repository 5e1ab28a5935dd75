"""What a failed export says: the format, the layer, and why, in one line a user can act on."""

from __future__ import annotations

import re

# Exporter messages carry terminal colours and pages of advice; the reason is one line of them.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
REASON_CHARS = 400


class ExportError(RuntimeError):
    """An export that could not be written or checked. `layer` names the module that fails (its name in the model,
    "" for the whole model), `reason` says why; the message holds both."""

    def __init__(self, format: str, reason: str, layer: str | None = None, layer_type: str | None = None):
        self.format, self.reason, self.layer, self.layer_type = format, reason, layer, layer_type
        where = f"layer '{layer}' ({layer_type})" if layer else "the model"
        super().__init__(f"cannot export {where} to format={format}: {reason}")


def exporter_reason(error: BaseException) -> str:
    """The informative line of an exporter's error, as "ErrorType: what". torch.onnx puts the cause under
    "## Exception summary" (as "<class 'TypeError'>: ..."), after a generic first line; torch.export's first line
    is the cause itself."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        summary = lines[lines.index("## Exception summary") + 1:]
        causes = [re.sub(r"^<class '(?:[\w]+\.)*(\w+)'>: ", r"\1: ", line) for line in summary
                  if line.startswith("<class ")]
        if causes:
            return _trim(causes[0])
    return _trim(f"{type(error).__name__}: {lines[0] if lines else 'no message'}")


def _trim(reason: str) -> str:
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 3] + "..."
