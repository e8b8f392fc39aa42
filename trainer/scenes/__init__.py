"""Procedural scenes: a world whose truth is known exactly, its captions, edits and a scorer (docs/SCENES.md)."""
