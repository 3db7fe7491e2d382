"""CCP-EM pipeliner (Doppio) job types for cryoal_ext.

The pipeliner finds job types through the ``ccpem_pipeliner.jobs`` entry-point group; ours are
registered in pyproject.toml and need the ``pipeliner`` extra (``pip install -e ".[pipeliner]"``):

* ``cryoal.autopick.active_learning``: one labelling round per run; continuing the job runs the next
  round (labels from the reviewed queries), and a final run picks every micrograph.
* ``cryoal.autopick.predict``: picks every micrograph with a saved model; no labels.

Both run the RELION External job's entry point (``python -m cryoal_ext.relion``) with the same
arguments: one engine and one set of review rules for RELION and the pipeliner.  See docs/pipeliner.md.
"""
