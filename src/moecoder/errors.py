"""Errors shared across moecoder's command-line modules (kept apart from cli.py to avoid import cycles)."""


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""
