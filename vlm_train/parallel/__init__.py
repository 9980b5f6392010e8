"""Everything about processes and sharding, applied to a built model from outside it."""
