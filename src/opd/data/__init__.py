"""Prompts in, rendered prompt text out."""
