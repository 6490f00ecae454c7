# cython: language_level=3
"""Compiled kernels of fastraft: quorum arithmetic, term-by-index log bookkeeping, and the
batch codec. No I/O. Behaviour is defined by the pure-Python twin in ``fastraft._py``."""

include "quorum.pyx"
include "logindex.pyx"
include "codec.pyx"
