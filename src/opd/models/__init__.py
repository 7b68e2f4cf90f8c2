"""Models in: checking a model folder before transformers reads it, and loading the student,
teacher and reference (`loading`)."""
