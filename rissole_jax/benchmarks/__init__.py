"""Benchmarks: scripts that measure, not tests (python -m rissole_jax.benchmarks.NAME)."""


def markdown_table(rows, cols) -> str:
  """A markdown table of dict rows; cols: (key, header) pairs. Floats with
  four significant digits, a missing value as a dash."""
  lines = ["| " + " | ".join(c for _, c in cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = []
    for key, _ in cols:
      v = r.get(key)
      cells.append("–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
