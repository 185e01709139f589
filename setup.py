"""The build of xenmig: metadata in setup.cfg; here the one native module."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # The BLAKE3 tree below the root, for the disk kind's block digests;
        # optional: without it the disk kind hashes changed blocks whole.
        Extension(
            "xenmig.devices.disk._leafhash",
            ["xenmig/devices/disk/_leafhash.c"],
            extra_compile_args=["-O3", "-Wno-psabi"],
            optional=True,
        )
    ]
)
