"""speft: sparse parameter-efficient fine-tuning with salience-selected masks."""

__version__ = "0.1.0"
