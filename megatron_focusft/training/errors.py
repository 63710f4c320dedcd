"""The error of a training run that cannot start or resume as asked."""

from __future__ import annotations


class SetupError(ValueError):
    """A bad flag, flag combination, checkpoint or data set; the message names the flag.

    ``tools/train.py`` prints ``error: <message>`` on one line and exits 2 (:func:`loop.main`)."""
