"""The RELION host: RELION's file formats and the External job (``python -m cryoal_ext.relion``).

``star`` (STAR reading, versions, node labels, job paths), ``micrographs`` (micrographs STAR,
pixel sizes, headers), ``coordinates`` (coordinate files, FOM, Extract's threshold), ``markers``
(exit markers, abort, output nodes); the job: ``settings``, ``job`` with its steps ``inputs``,
``labels_in`` and ``report``, and the entry points in ``cli``.  No engine logic here.
"""
