"""Dataset plugins; registered under `kdbench.datasets`."""
