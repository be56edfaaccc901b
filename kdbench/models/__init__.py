"""Model architectures, one family per file; registered under `kdbench.models`."""
