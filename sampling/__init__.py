"""Generation inputs as the reference pipeline builds them: prompts, conditioning clips and the action modes."""
