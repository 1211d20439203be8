"""MM-PRM platform: every pipeline stage as plain, typed functions."""
