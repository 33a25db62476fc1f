"""Stage 2, plan (pure): a recipe becomes a plan, and a base its name; no I/O."""
