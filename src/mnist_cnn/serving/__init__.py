"""What users get: picture preparation, the "not a digit" refusal, the served model and the predict CLI."""
