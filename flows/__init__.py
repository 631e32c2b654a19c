"""Prefect flows: thin orchestration over pipeline.jobs (DESIGN.md)."""
