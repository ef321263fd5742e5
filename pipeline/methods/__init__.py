"""Methods: PSST (Stage 1) and, as they come, the Stage-2 methods."""
