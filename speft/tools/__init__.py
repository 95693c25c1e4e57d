"""Measuring tools beside the library (``python -m speft.tools.<name>``): they use it, nothing in it uses them.

* ``bench``: step time and peak memory of sparse, LoRA, full and frozen training on a model shape;
* ``salience_bench``: time and peak memory of each salience metric's scoring.
"""
