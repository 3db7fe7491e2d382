"""cryoal_ext: active-learning particle picking on Topaz features for RELION and cryoSPARC."""

__version__ = "0.1.0"
