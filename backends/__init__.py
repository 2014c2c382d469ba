"""qpass backends (lowering). The repository folder ``backends/`` is installed as ``qpass.backends``."""
