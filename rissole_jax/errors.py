"""Errors that name the problem and the fix; the CLI prints them without a traceback."""


class RissoleError(RuntimeError):
  """Base class: the message says what is wrong and how to fix it."""


class ConfigError(RissoleError, ValueError):
  """The config is inconsistent (e.g. a block grid that does not divide the latent)."""


class DataError(RissoleError):
  """A dataset is missing or malformed."""


class WorkdirMismatch(RissoleError):
  """The workdir holds a stage made with another config."""


class IndexMismatch(RissoleError):
  """An index or latent file was made by another autoencoder/config, or is damaged."""


def check_choice(key: str, value, choices, error=None, hint: str = "") -> None:
  """Refuses a value outside `choices`, naming the key, the value and every
  choice: the one "Unknown X: use one of ..." check (ConfigError unless
  `error` gives another type; `hint` is appended to the message)."""
  if value not in choices:
    raise (error or ConfigError)(
        f"Unknown {key} {value!r}: use one of {tuple(choices)}." + (f" {hint}" if hint else ""))
