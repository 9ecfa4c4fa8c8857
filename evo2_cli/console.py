"""The one place that decides how evo2 writes to the terminal: every command and every core progress display
gets its rich console from `make_console`.

In a terminal rich wraps at the terminal's width, as a reader expects. When the stream is a file or a pipe (a
batch job's log, `| grep`, a test's captured output) nothing is hard-wrapped: a message or a path stays on one
line whatever COLUMNS or the path's length, and a table keeps its natural width.
"""

from __future__ import annotations

from rich.console import Console, ConsoleDimensions

# Wide enough that no message, path or table row of ours reaches it; rich pads nothing to the console's width
# (tables and progress bars are not expanded), so a large value costs nothing.
UNWRAPPED_WIDTH = 100_000


def _is_tty(stream) -> bool:
    # The stream itself, not rich's `is_terminal`: FORCE_COLOR (set by many CI runners) asks for colours, not
    # for lines cut at 80 columns.
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Console(Console):
    """A rich Console whose width is the terminal's when it writes to one, and unbounded otherwise. Decided at
    each print from the stream of that moment, so a console made at import time follows a later redirect."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if _is_tty(self.file) else ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


def make_console(stderr: bool = True) -> Console:
    """The console every message, table and progress bar goes through (stderr unless asked otherwise: stdout
    is kept for results a user pipes on)."""
    return _Console(stderr=stderr)
