"""Where and how programs run: the device mesh and shardings (parallel.py), the
XLA:CPU flags set on import (xla_flags.py) and the user cache with JAX's
compilation cache (cache.py). Imports nothing heavy: `import rissole_jax`
reads xla_flags from here before JAX starts."""
