"""Ray programs, each runnable with ``python -m`` (what ``ray job submit`` runs)."""
