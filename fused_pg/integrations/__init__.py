"""Drop-ins for RL trainers. Each module imports its trainer package when it is imported itself,
never before: ``import fused_pg`` needs none of them.

* :mod:`fused_pg.integrations.trl`: ``GRPOTrainer`` whose policy loss runs fused from hidden
  states inside the model's forward (TRL >= 1.16, transformers >= 5).
* :mod:`fused_pg.integrations.verl`: the ``"repo"`` and ``"adapo"`` policy losses for verl's
  registry (``actor.policy_loss.loss_mode=repo``).
* :mod:`fused_pg.integrations.openrlhf`: ``PolicyLoss``, a drop-in for OpenRLHF's.
"""
