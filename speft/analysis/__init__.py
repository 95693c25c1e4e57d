"""Analyses of finished runs and saved salience scores (``python -m speft.analysis.<name>``)."""
