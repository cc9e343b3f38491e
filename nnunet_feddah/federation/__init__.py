"""The federation room: the plan, the engine-agnostic round loop, checkpoints and the site round.

Holds: :mod:`.plan` (the plan model: sites, task streams, schedule), :mod:`.plan_reader` (the JSON reader
that reports every problem at once), :mod:`.site_data` (the check of every site's nnU-Net data),
:mod:`.coordinator` (jobs -> executor -> validate -> strategy update -> commit), :mod:`.checkpoint` (the one
reader and writer of a state folder), :mod:`.lock` (one coordinator per state folder), :mod:`.logfile` (the
coordinator's timestamped log), :mod:`.start` (the shared plans and base network a coordinator opens with)
and :mod:`.site_round` (one site's round with FedDAHTrainer, and the in-process executor).

May import: ``method``, the base modules and, for the site side only (:mod:`.site_round`,
:mod:`.site_data`, :mod:`.start`), ``nnunet``. The plan modules and the coordinator import no nnU-Net, so a
coordinator reads a plan and runs rounds without paying nnU-Net's start-up cost. Never Flower.
"""
