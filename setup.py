"""The one compiled part of Switchyard: the endpoint picker's native engine
(controlplane/picker/_native.c, docs/routing.md). Everything else is in pyproject.toml.

`optional`: where no C compiler is found (a slim image), the install still succeeds and the
picker runs its pure-Python engine (`picker.engine: auto`), as it tells in its log."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "controlplane.picker._native",
            ["controlplane/picker/_native.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
            libraries=["m", "pthread"],
            optional=True,
        )
    ]
)
