"""Pieces the trainer integrations share: importing a trainer package with an error that says
how to install it, and stepping an ADAPO controller from inside a loss function."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..checks import positive_int
from ..control import AdaptiveClip


def require(module: str, *, package: str, minimum: str | None, extra: str):
    """Import ``module`` (a trainer package), or raise ImportError naming the install command."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"fused_pg.integrations.{extra} needs {package}"
                          f"{'>=' + minimum if minimum else ''}: pip install 'fused-pg[{extra}]' "
                          f"({type(e).__name__}: {e})") from e
    if minimum is not None:
        from packaging.version import Version

        version = getattr(mod, "__version__", None)
        if version is not None and Version(version) < Version(minimum):
            raise ImportError(f"fused_pg.integrations.{extra} needs {package}>={minimum}, found {version}")
    return mod


class ControllerStepper:
    """Steps an ADAPO controller once per optimiser step when the loss function is all a trainer
    lets us replace (verl, OpenRLHF): the step boundary is every ``update_every``-th call.

    The entropy fed to the controller is the mean surprisal ``-log pi_old(y_t)`` of the sampled
    tokens over the calls of the window: for tokens sampled from the behaviour policy it is an
    unbiased estimate of that policy's mean token entropy (``E_{y ~ pi}[-log pi(y)] = H(pi)``),
    and it needs nothing but the behaviour log-probs the loss already has. With
    ``torch.distributed`` initialised the window's sums are all-reduced first (one collective
    per optimiser step; every rank steps at the same call), so all ranks keep the same clip range.

    Args:
        controller:   the :class:`fused_pg.AdaptiveClip` to step.
        update_every: loss calls per optimiser step on each rank (the number of gradient
                      accumulation micro-batches).
    """

    def __init__(self, controller: AdaptiveClip, update_every: int):
        if not isinstance(controller, AdaptiveClip):
            raise TypeError(f"controller must be a fused_pg.AdaptiveClip, got {type(controller).__name__}")
        self.controller = controller
        self.update_every = positive_int("update_every", update_every)
        self.calls = 0

    def observe(self, old_logprobs: Tensor, mask: Tensor) -> bool:
        """Record one loss call's behaviour log-probs; step the controller at the window's end.
        Returns whether it stepped."""
        counted = mask.detach().bool()
        n_tokens = counted.sum().to(torch.float64)
        # padding may hold anything (-inf included): only the counted tokens enter the sum
        surprisal = torch.where(counted, -old_logprobs.detach().to(torch.float64), 0.0).sum() / n_tokens.clamp_min(1.0)
        self.controller.observe(surprisal, n_tokens)  # token-weighted, no host sync
        self.calls += 1
        if self.calls % self.update_every:
            return False
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.controller.update(process_group=torch.distributed.group.WORLD if distributed else None)
        return True

    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "calls": self.calls,
                "update_every": self.update_every}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.calls = int(state["calls"])
        self.update_every = positive_int("update_every", state["update_every"])
