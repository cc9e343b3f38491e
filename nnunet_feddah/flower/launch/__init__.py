"""Process tooling around the Flower adapter: starting and watching Flower's own processes.

Holds: :mod:`.local` (a whole federation on loopback: TLS SuperLink, one authenticated SuperNode per site),
:mod:`.remote` (``flwr run`` against a deployed SuperLink), :mod:`.supernode` (a site's ``flower-supernode``
command line, ``python -m nnunet_feddah.site``), :mod:`.flwr_cli`, :mod:`.procs`, :mod:`.guardian`,
:mod:`.pki` and :mod:`.logtail`. May import: ``federation``, the base modules and Flower's command-line tools.
"""
