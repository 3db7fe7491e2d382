"""The cryoSPARC host: .cs datasets and the external job (``cryoal cryosparc``).

``data`` (.cs datasets, fields, conversions to and from the engine's specs, labels and picks),
``job`` (one round or the final picks, shared by both modes), ``live`` (the cryoSPARC connection
and the external job through cryosparc-tools), ``cli`` (arguments and ``main``).
"""
