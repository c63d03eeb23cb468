"""The package's version, in a module of its own (as timm's ``version.py``) so that the modules that record it (an
export's config.json, an error naming the installed version) import it at their top without importing the package
``__init__``, which imports them."""
__version__ = '0.1.0'
