"""The data room: site datasets in nnU-Net's raw format.

Holds: :mod:`.phantom` and :mod:`.anatomy` (the AMOS-like synthetic CT cohort, the default data),
:mod:`.amos` (an AMOS22 download -> FedDAH site datasets) and :mod:`.sites` (what both share: which organs
each site annotates, ``--annotate`` parsing, the safe replacement of a dataset folder this tool wrote).

May import: SimpleITK, nibabel, numpy, ``nnunet`` (shared plans, for ``nnfeddah amos --plans``),
``federation`` (a plan's sites, for ``nnfeddah amos --plan``) and the base modules.
"""
