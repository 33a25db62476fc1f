"""Stage 1, load: the target table, the recipe models and loading recipe YAML into them."""
