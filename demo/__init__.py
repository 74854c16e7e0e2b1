"""The one-command system demo (``python -m demo``, ``make demo``)."""
