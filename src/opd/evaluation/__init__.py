"""Accuracy of a model on prompts with answers (`accuracy`), and the answer verifiers
(`verify`)."""
