"""Pipelines: the stage graph, its executor, stage kinds and sandboxed templates."""
