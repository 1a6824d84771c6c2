"""The catalog of official checkpoints, downloads and cache, label lists, synthetic stand-ins and trained fixtures."""
