"""Search a gallery of your own with a trained model: `python -m search index | search | serve` (docs/SEARCH.md)."""
