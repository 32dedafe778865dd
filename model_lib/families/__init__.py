"""Per-family config mappings and weight maps; the registry imports them lazily."""
