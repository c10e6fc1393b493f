"""The one exception type user-facing code raises for bad input or missing resources.

The CLI turns it into a single line on stderr and exit code 2; the Python API lets it propagate.
"""


class VtcbenchError(ValueError):
    """A user-facing error whose message is one line naming the bad value and the valid choices."""


def choices_error(kind: str, value: object, valid: list[str] | tuple[str, ...]) -> VtcbenchError:
    return VtcbenchError(f"unknown {kind} {value!r}; valid choices: {', '.join(sorted(valid))}")
