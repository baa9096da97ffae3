"""Build logic for the l4lb data plane extension (metadata lives in pyproject.toml)."""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

if sys.platform != "linux":
    sys.exit("l4lb's data plane needs Linux (epoll, splice, eventfd)")

C_SOURCES = [
    "src/dp.c",
    "src/worker.c",
    "src/pipe_pool.c",
    "src/udp.c",
    "src/service.c",
    "src/persist.c",
    "src/probe.c",
    "src/proxy.c",
    "src/vip_counters.c",
    "src/sched_rr.c",
    "src/sched_wrr.c",
    "src/sched_lc.c",
    "src/sched_wlc.c",
    "src/sched_sed.c",
    "src/sched_nq.c",
    "src/sched_sh.c",
    "src/sched_dh.c",
]
DEPENDS = [os.path.join("src", f) for f in os.listdir("src") if f.endswith((".h", ".pxi"))]
DEPENDS += [os.path.join("src/includes", f) for f in os.listdir("src/includes")]
CFLAGS = [*os.environ.get("L4LB_OPT_CFLAGS", "-O2 -g").split(), "-std=gnu11", "-Wall"]


class build_ext(_build_ext):
    """Always cythonize at build time; `--debug` builds with L4LB_DEBUG and line tracing."""

    def finalize_options(self) -> None:
        from Cython.Build import cythonize

        directives = {}
        macros = []
        if self.debug:
            directives["linetrace"] = True
            macros = [("L4LB_DEBUG", "1"), ("CYTHON_TRACE_NOGIL", "1")]
        for ext in self.distribution.ext_modules:
            ext.define_macros.extend(macros)
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            include_path=["src"],
            build_dir="build/cython",
            compiler_directives=directives,
            annotate=bool(os.environ.get("L4LB_ANNOTATE")),
        )
        super().finalize_options()


setup(
    ext_modules=[
        Extension(
            "l4lb._dataplane",
            sources=["src/_dataplane.pyx", *C_SOURCES],
            include_dirs=["src"],
            depends=DEPENDS,
            extra_compile_args=CFLAGS,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
