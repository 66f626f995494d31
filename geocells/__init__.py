"""Semantic geocells: administrative boundaries + H3, balanced by photo count (see README.md)."""
