"""User-facing errors: a problem the user can fix is raised as UserError and printed as one sentence.

Every script's main runs under utils.cli.run_main, which prints a UserError as `error: <sentence>` and exits 2,
never with a traceback. ConfigError is the config loader's kind of UserError.
"""


class UserError(Exception):
    """A problem the user can fix; printed as one sentence, never a traceback."""


class ConfigError(UserError):
    pass

