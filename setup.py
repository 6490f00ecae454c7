"""Builds the one extension, ``fastraft._cy``, unless FASTRAFT_NO_EXTENSIONS is set.

A missing compiler or Cython must never make ``pip install`` fail: the package then
installs as pure Python (``fastraft._py``) and says so with a warning.
"""
import os
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = bool(os.environ.get("FASTRAFT_NO_EXTENSIONS"))


class OptionalBuildExt(build_ext):
    """build_ext that degrades to pure Python instead of failing the install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing, Cython missing, ...
            self._fallback(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._fallback(exc)

    @staticmethod
    def _fallback(exc):
        msg = (
            f"fastraft: building the Cython extension failed ({exc!r}); "
            "installing the pure-Python kernels instead (slower, same behaviour)."
        )
        warnings.warn(msg, stacklevel=1)
        print(msg, file=sys.stderr)


def extensions():
    if NO_EXTENSIONS:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        OptionalBuildExt._fallback(ImportError("Cython is not installed"))
        return []
    ext = Extension(
        "fastraft._cy",
        ["src_cy/_cy.pyx"],
        extra_compile_args=["-O2"] if sys.platform != "win32" else [],
    )
    return cythonize(
        [ext],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
        include_path=["src_cy"],
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
