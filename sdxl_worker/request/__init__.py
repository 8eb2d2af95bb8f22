"""1. Validate: the job's ``input`` -> typed parameters (schema, the ``loras`` entries, prompt tags, aliases)."""
