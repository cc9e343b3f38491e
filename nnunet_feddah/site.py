"""``python -m nnunet_feddah.site``: this site's side of a Flower federation (its SuperNode).

An entry point only: the site's round itself is :func:`nnunet_feddah.federation.site_round.run_site_round`,
the SuperNode command line is :mod:`nnunet_feddah.flower.launch.supernode`.
"""

from nnunet_feddah.flower.launch.supernode import main

if __name__ == "__main__":
    raise SystemExit(main())
