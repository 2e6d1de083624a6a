"""Test doubles for users' own tests: fake engines that need no model."""

from multilane.engines.testing import CallRecord, FakeEmbeddingEngine, FakeGenerateEngine, Pace, example_for_schema

__all__ = ["CallRecord", "FakeEmbeddingEngine", "FakeGenerateEngine", "Pace", "example_for_schema"]
