"""Helpers shared by the tests: tiny models, Trainer runs, model folders and a local Hub server."""
