"""The alert rules: their shared base, the catalogue and engine, and one module per family of rules."""
