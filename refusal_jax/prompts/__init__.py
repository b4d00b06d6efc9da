"""Prompts: instruction datasets and chat templates."""
