"""The buffer stage: measure every location, publish its state, escalate, and sweep the
temporary names that killed writes leave behind (the janitor)."""
