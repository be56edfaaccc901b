"""Looking at models rather than losses: CKA maps, training-free student ranking, curves.

Each submodule backs one command: :mod:`.cka` (``kdbench cka``), :mod:`.rank`
(``kdbench rank-students``), :mod:`.plots` (``kdbench plot``; TensorBoard event files are
written by every cell's default logger, kdbench/loggers/tensorboard.py), :mod:`.tolerant` (the tolerant
teacher's loss term, a ``kdbench.losses`` plugin usable as a teacher recipe's method).
"""
