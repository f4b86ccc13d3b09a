"""Build hook for the optional native cache decoder (all metadata lives in pyproject.toml).

`dist_distill.teacher.cache._codec_native` codes and decodes teacher-cache rows many times faster than numpy; if it
cannot be compiled (no C compiler), installation goes on and the numpy decoder is used.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dist_distill.teacher.cache._codec_native",
                             ["dist_distill/teacher/cache/_codec_native.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-strict-aliasing"],
                             optional=True)])
