"""Every module of rissole_jax imports together with every other in one
process: no absl flag is defined twice (each benchmark CLI defines its flags
when it runs, not on import)."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")

CODE = """
import importlib, pathlib
for p in sorted(pathlib.Path("rissole_jax").rglob("*.py")):
  parts = list(p.with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  importlib.import_module(".".join(parts))
"""


def test_every_module_imports_together():
  r = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
