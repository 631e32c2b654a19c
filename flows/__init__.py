"""Prefect flows: thin orchestration over pipeline.jobs (DESIGN.md)."""


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) from any text."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "run"
