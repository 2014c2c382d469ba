"""Regenerate docs/recipes.md (the recipe schema reference) from the pass config dataclasses."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qpass.recipe import schema_markdown  # noqa: E402
from qpass.tables import write_atomic  # noqa: E402

path = os.path.join(ROOT, "docs", "recipes.md")
write_atomic(path, schema_markdown())
print(f"wrote {os.path.relpath(path, ROOT)}")
