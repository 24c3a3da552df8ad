"""User errors: one line saying what is wrong and what to do; entry points exit with code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). str(exc) is one printable line."""

    exit_code = 2


# Exit codes shared by every entry point (documented in the README).
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_REQUEUE = 75  # sysexits' EX_TEMPFAIL: stopped cleanly after a checkpoint; requeue me
