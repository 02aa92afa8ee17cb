"""Post-processing: the PostProcess decision, its exact search, the submission."""
