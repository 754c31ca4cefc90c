"""metalearn: gradient-based meta-learning experiments in JAX (CLI: ``metalearn``)."""

from metalearn.xla_workarounds import apply_xla_workarounds

# Before any JAX backend starts: XLA reads XLA_FLAGS once, when the first backend is created.
apply_xla_workarounds()
