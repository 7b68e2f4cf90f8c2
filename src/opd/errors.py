"""The one exception type users meet: a message that names the input at fault and the fix."""

from __future__ import annotations


class OPDError(Exception):
    """Bad input or an impossible request; the CLI prints the message without a traceback."""


def one_line(err: BaseException | str, limit: int = 240) -> str:
    """A library's error message as one short line (whitespace collapsed, cut at `limit`)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
