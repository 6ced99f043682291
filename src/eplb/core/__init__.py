"""The core planner."""
