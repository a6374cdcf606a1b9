"""The BentoML prediction service."""
