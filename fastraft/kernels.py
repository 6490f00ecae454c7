"""The kernels, compiled (``fastraft._cy``) or pure Python (``fastraft._py``).

Chosen once at import: ``FASTRAFT_NO_EXTENSIONS`` (any non-empty value) or a missing
extension selects the pure-Python twin. ``COMPILED`` says which one is in use. The names
re-exported are the same either way.
"""
from __future__ import annotations

import os

COMPILED: bool

if os.environ.get("FASTRAFT_NO_EXTENSIONS"):
    from fastraft._py import *  # noqa: F401,F403
    from fastraft._py import __all__
    COMPILED = False
else:
    try:
        from fastraft._cy import *  # noqa: F401,F403
        from fastraft._py import __all__
        COMPILED = True
    except ImportError:
        from fastraft._py import *  # noqa: F401,F403
        from fastraft._py import __all__
        COMPILED = False
