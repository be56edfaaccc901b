"""KD methods, one file each; registered in pyproject.toml under `kdbench.losses`."""
