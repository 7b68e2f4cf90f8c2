"""The study's recipes for failing OPD runs (SPEC §6): off-policy cold start and
teacher-aligned prompt selection."""
