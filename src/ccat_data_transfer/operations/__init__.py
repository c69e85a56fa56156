"""Operations: watch and mend the whole system (recovery, audit, metrics, the orchestrator
that runs every stage in one process, the instrument simulator).  May import every stage
and core; no stage imports it."""
