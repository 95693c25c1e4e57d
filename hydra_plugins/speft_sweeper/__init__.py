"""speft's Hydra plugin: the sweeper for growing sweep folders (speft_sweeper.py)."""
