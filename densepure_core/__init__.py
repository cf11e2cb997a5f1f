"""densepure_core."""
