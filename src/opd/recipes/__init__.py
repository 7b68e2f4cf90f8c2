"""The study's recipes for failing OPD runs (docs/method.md#recipes): off-policy cold start and
teacher-aligned prompt selection."""
