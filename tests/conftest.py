"""Test setup: 8 fake CPU devices, so sharding is exercised for real on a laptop.

XLA reads XLA_FLAGS when jax first initialises its backends, so this must run before any
test imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
