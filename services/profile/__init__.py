"""Profile: merges every fragment of a person into one unified profile, with events."""
