"""The kernels, compiled (``fastraft._cy``) or pure Python (``fastraft._py``).

Chosen once at import: ``FASTRAFT_NO_EXTENSIONS`` (any non-empty value) or a missing
extension selects the pure-Python twin. ``COMPILED`` says which one is in use. The names
re-exported are the same either way: the twin's ``__all__``.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from fastraft._py import __all__  # noqa: F401  (re-exported: the kernel names)

COMPILED: bool

if TYPE_CHECKING:  # both implement the same names; type-check against the reference
    from fastraft._py import *  # noqa: F403
elif os.environ.get("FASTRAFT_NO_EXTENSIONS"):
    from fastraft._py import *  # noqa: F403
    COMPILED = False
else:
    try:
        from fastraft._cy import *  # noqa: F403
        COMPILED = True
    except ImportError:
        from fastraft._py import *  # noqa: F403
        COMPILED = False
