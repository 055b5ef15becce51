"""Built-in model mergers, one module each (reference rows in ``references.py``)."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
