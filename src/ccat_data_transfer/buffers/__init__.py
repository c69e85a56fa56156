"""The buffer stage: measure every location, publish its state, escalate, and sweep the
temporary names that killed writes leave behind (the janitor)."""

#: The modules other stages may import (tests/test_import_contract.py checks it).
# No other stage imports buffers (operations.audit runs the janitor, from above).
PUBLIC: tuple[str, ...] = ()
