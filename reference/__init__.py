"""Readable reference models in the source frameworks, with the original checkpoint names; they know no file format."""
