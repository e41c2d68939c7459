"""Journal entries and the insights extracted from them."""
