"""What every config section is built from: a documented field (`doc`: its help is the CLI flag's), the
check that names the field and its limit (`require`), and the check of an output file named by an option."""
from __future__ import annotations

import os
from dataclasses import field
from pathlib import Path


def doc(help: str, **kw):
    """A dataclass field with its documentation attached (the CLI help text)."""
    return field(metadata={"help": help}, **kw)


def require(cond: bool, section: str, name: str, limit: str, value) -> None:
    if not cond:
        raise ValueError(f"{section}.{name} must be {limit}, got {value!r}")


def same_file(a: str, b: str) -> bool:
    """Whether paths `a` and `b` name one file, however spelt (./x, a symlink, ..)."""
    return Path(a).resolve() == Path(b).resolve()


def check_output_file(path: str, name: str) -> None:
    """Refuse an output file that could not be written, before the work that fills it (minutes of
    generation or fitting would otherwise end in a traceback from open()); creates its parent directories."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name} {path}: is a directory, expected a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent that is a file, or no permission
        raise ValueError(f"{name} {path}: cannot create its directory ({e.strerror})") from None
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"{name} {path}: not writable")
