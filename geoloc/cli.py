"""Entry-point plumbing: a user's bad input or bad file ends in one clear line, never a Python traceback.

Every command (``train.py``, ``evaluate.py``, ``python -m geoloc STEP``, ``geocells.build``,
``geoloc-predict``) runs its body through :func:`user_errors`; the offline steps are Hydra apps started by
:func:`run_step`. Library code raises ordinary exceptions whose messages name the file, row or value and
say what to do (``ValueError``, ``FileNotFoundError``, ...); here they become ``PROG: error: MESSAGE`` on
stderr and exit status 2. Anything else is a bug and keeps its traceback, and ``GEOLOC_DEBUG=1`` shows the
traceback of user errors too.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

#: Exceptions that mean "the input is wrong", when raised with a message for people.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, IsADirectoryError,
                                                NotADirectoryError, PermissionError, FileExistsError,
                                                ModuleNotFoundError)  # an optional package not installed
EXIT_USER_ERROR = 2


def user_message(exc: BaseException) -> str | None:
    """The message to show for a user error, or None when ``exc`` is not one (a bug: keep the traceback).

    Hydra wraps what a ``_target_`` raised in an ``InstantiationException``; the cause is what counts.
    A missing ``???`` setting becomes a hint to give it on the command line.
    """
    try:
        from hydra.errors import InstantiationException
    except ImportError:  # pragma: no cover - hydra is a dependency
        InstantiationException = ()  # noqa: N806
    try:
        from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
    except ImportError:  # pragma: no cover
        MissingMandatoryValue = OmegaConfBaseException = ()  # noqa: N806
    if InstantiationException and isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        return user_message(exc.__cause__)
    if MissingMandatoryValue and isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", None) or str(exc).split(":", 1)[-1].strip().splitlines()[0]
        return f"the setting '{key}' is required: give it on the command line ({key}=...)"
    if OmegaConfBaseException and isinstance(exc, OmegaConfBaseException):
        return str(exc).strip().splitlines()[0]
    if isinstance(exc, USER_ERRORS):
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc):
            return f"{exc.filename}: {exc.strerror or exc}"
        return str(exc)
    return None


def run_step(config_name: str, fn: Callable, prog: str):
    """Runs an offline step's body as a Hydra app on ``conf/{config_name}.yaml`` (``key=value`` overrides from
    the command line), with :func:`user_errors`. Every step (``python -m geoloc STEP``) starts here."""
    from pathlib import Path

    import hydra

    conf = Path(__file__).resolve().parents[1] / "conf"  # the repository's conf/ beside the package
    return hydra.main(version_base="1.3", config_path=str(conf), config_name=config_name)(user_errors(prog)(fn))()


def user_errors(prog: str) -> Callable:
    """Decorator for an entry point's body: user errors print ``prog: error: ...`` and exit with status 2.

    Put it under ``@hydra.main`` so Hydra never sees the exception (Hydra would print a traceback).
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs just below
                message = user_message(e)
                if message is None or os.environ.get("GEOLOC_DEBUG"):
                    raise
                print(f"{prog}: error: {message}", file=sys.stderr)
                raise SystemExit(EXIT_USER_ERROR) from None

        return wrapper

    return decorate
