"""The exceptions optc raises. Every one derives from :class:`OptcError`."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple


class Diagnostic(NamedTuple):
    """One report about a rule: severity ("error" or "warning"), a stable code such as
    ``E0201``, the message, and the byte span ``(start, end)`` it points at."""

    severity: str
    code: str
    message: str
    span: Tuple[int, int]


class OptcError(Exception):
    """Base class of optc's exceptions."""


class RuleError(OptcError, ValueError):
    """A rule that does not compile.

    ``report`` is the rendered report (every diagnostic, with the source lines they point at);
    ``diagnostics`` lists them; ``code``, ``message`` and ``span`` are the first error's.
    """

    def __init__(self, report: str, diagnostics: List[tuple]):
        super().__init__(report)
        self.report = report
        self.diagnostics = [Diagnostic(sev, code, msg, (start, end))
                            for sev, code, msg, start, end in diagnostics]
        first: Optional[Diagnostic] = next(
            (d for d in self.diagnostics if d.severity == "error"), None)
        self.code = first.code if first else None
        self.message = first.message if first else report
        self.span = first.span if first else None


class ConfigError(OptcError, ValueError):
    """What the caller asked cannot be done: an unknown or out-of-range hyperparameter, a
    tensor of the wrong device, dtype, shape or layout, a missing or unknown input, stages out
    of order. Nothing was changed."""


class CheckpointError(OptcError, ValueError):
    """A saved state that does not fit this optimizer (another rule, other tensors) or is
    damaged. Nothing was changed."""


class NonFiniteError(OptcError, RuntimeError):
    """An input held an infinity or a NaN under ``non_finite="error"``; the step was not taken
    and nothing was changed."""


class EngineError(OptcError, RuntimeError):
    """The engine failed: machine code could not be built or run, threads could not start, a
    CUDA call failed."""
