"""The types everything shares: errors, strict volume I/O, atomic writes, JSON, safe names, dataset specs.

This layer imports nothing else of the project."""
