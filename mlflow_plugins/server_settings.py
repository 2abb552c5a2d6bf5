"""Server limits read from the environment of ``mlflow models serve`` (the flavor has no other input)."""

from __future__ import annotations

import os

from lightning_privacy.errors import ServingConfigError


def positive_int(value: int | None, env: str, default: int) -> int:
    """``value`` if given, else the environment variable ``env``, else ``default``.

    Raises:
        ServingConfigError: the value (given or from ``env``) is not a positive integer.
    """
    if value is None:
        raw = os.environ.get(env)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ServingConfigError(f"{env}={raw!r} is not an integer; set a positive integer.") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ServingConfigError(f"{env} (or the argument overriding it) must be a positive integer, got {value!r}.")
    return value


def enabled(env: str, default: bool = True) -> bool:
    """Whether the switch ``env`` is on: ``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``.

    Raises:
        ServingConfigError: any other value.
    """
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ServingConfigError(f"{env}={raw!r} is neither on (1, true, yes, on) nor off (0, false, no, off).")
