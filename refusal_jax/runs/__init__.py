"""Run directories (atomic artifacts, recorded config, resume) and command-line plumbing."""
