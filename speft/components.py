"""Import every component module so that its @register decorator runs.

A new metric, mask, task, method or logger is one module in its package plus one YAML file in
``conf/<group>/``: modules are found here by walking the packages, no list to edit.
"""

import importlib
import pkgutil

PACKAGES = ("speft.loggers", "speft.masks", "speft.methods", "speft.salience", "speft.tasks")

for _pkg_name in PACKAGES:
    _pkg = importlib.import_module(_pkg_name)
    for _info in pkgutil.iter_modules(_pkg.__path__):
        importlib.import_module(f"{_pkg_name}.{_info.name}")
