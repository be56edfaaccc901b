"""Looking at models rather than losses: CKA maps, training-free student ranking, curves.

Each submodule backs one command: :mod:`.cka` (``kdbench cka``), :mod:`.rank`
(``kdbench rank-students``), :mod:`.plots` (``kdbench plot``), :mod:`.tensorboard` (event files
written by every cell when the ``plot`` extra is installed), :mod:`.tolerant` (the tolerant
teacher's loss term, a ``kdbench.losses`` plugin usable as a teacher recipe's method).
"""
