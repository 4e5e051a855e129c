"""Paper methods built on the MoE core; each lives in its own package."""
