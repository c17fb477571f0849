"""Drop-ins for RL trainers. Each module imports its trainer package when it is imported itself,
never before: ``import fused_pg`` needs none of them. Each computes the trainer's own loss unless
fused-pg's options are set through the trainer's configuration, checks the trainer internals it
relies on when it is set up, and is tested with one minor release of its trainer.

* :mod:`fused_pg.integrations.trl`: ``GRPOTrainer`` whose policy loss runs fused from hidden
  states inside the model's forward, and ``GRPOConfig`` with fused-pg's fields (trl 1.16).
* :mod:`fused_pg.integrations.verl`: the ``"repo"`` and ``"adapo"`` policy losses for verl's
  registry, with fused-pg's keys in verl's ``policy_loss`` config (verl 0.9).
* :mod:`fused_pg.integrations.openrlhf`: ``PolicyLoss``, a drop-in for OpenRLHF's, and a launcher
  that installs it in OpenRLHF's Ray actors (OpenRLHF 0.11).
"""
