"""Orbax checkpoints: exact resume onto any mesh, checksums, cut-off and failed saves, init_from.

  manager.py     `Checkpointer`: a run's saves and restores (asynchronous, integrity-checked).
  reading.py     A checkpoint read by path: config, `extra`, a subtree, `init_from`.
  integrity.py   The checksum per array, recorded at save and verified at restore.
  layout.py      The directory layout, complete and cut-off steps, moving steps aside.
  errors.py      The checkpoint errors and their one-line texts.
"""
