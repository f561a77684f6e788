"""The job's stages, one module each: `run(ctx) -> record`, the record kept in the stage's marker."""
