"""Joint posterior sampling of an image and its structured noise (knows nothing of Ray or storage)."""
