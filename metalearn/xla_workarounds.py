"""Flags that keep known XLA bugs of the installed jaxlib out of our computations.

jaxlib 0.10.2 runs some f32 multiply-reduce fusions on XLA:CPU through YNNPACK's ``reduce``
fusion, and that kernel reads out of bounds: a segmentation fault on an Eigen worker thread,
reported wherever Python happens to be (jax-ml/jax#40412, #39257; fixed in XNNPACK after the
release). Our ProtoNet training step with support and query as one BatchNorm batch hits it
about one run in two. Taking ``reduce`` out of the YNN fusion types leaves those reductions
to XLA's own emitter; the numbers are the same computation, only the kernel differs.

A user who sets ``--xla_cpu_experimental_ynn_fusion_type`` in XLA_FLAGS keeps their choice.
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
# The releases that carry the faulty kernel and know the flag (an unknown flag aborts XLA).
AFFECTED_JAXLIB = ((0, 10, 2), (0, 12, 0))


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def xla_flags_with_workarounds(flags: str, jaxlib_version: str | None) -> str:
    """XLA_FLAGS ``flags`` with the workaround for ``jaxlib_version`` added (unchanged if
    that release is unaffected, jaxlib is absent, or the user already set the flag)."""
    if jaxlib_version is None or YNN_FLAG in flags:
        return flags
    low, high = AFFECTED_JAXLIB
    if not low <= _version_tuple(jaxlib_version) < high:
        return flags
    return f"{flags} {YNN_FLAG}=-reduce".strip()


def apply_xla_workarounds(environ: dict[str, str] | None = None) -> None:
    """Add the workaround flags to ``environ`` (default os.environ) for the installed jaxlib."""
    environ = os.environ if environ is None else environ
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        version = None
    flags = xla_flags_with_workarounds(environ.get("XLA_FLAGS", ""), version)
    if flags:
        environ["XLA_FLAGS"] = flags
