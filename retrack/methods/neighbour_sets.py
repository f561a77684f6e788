"""The forget items' neighbour sets in the form the kNN term consumes, prepared once per run."""

from __future__ import annotations

import torch


class NeighbourSets:
    """Each forget item's K neighbours as differences from its first neighbour (the anchor of the
    kNN term's expansion), with their squared norms in float64.

    None of it depends on theta or t, so the drawer prepares it once per run and every batch points
    into it: the ReTrack step neither gathers nor re-derives the (sets, K, D) differences.
    """

    def __init__(self, anchor: torch.Tensor, diffs: torch.Tensor, sq_norms: torch.Tensor):
        self.anchor = anchor  # (S, D): n_1 of each set
        self.diffs = diffs  # (S, K, D): n_j - n_1
        self.sq_norms = sq_norms  # (S, K) float64: ||n_j - n_1||^2
        self._copies: dict[torch.device, NeighbourSets] = {}

    @classmethod
    def of(cls, neighbours: torch.Tensor) -> NeighbourSets:
        """From S neighbour sets shaped (S, K, ...) like the items."""
        with torch.no_grad():
            n = neighbours.detach().flatten(2).float()
            anchor = n[:, 0]
            diffs = n - anchor.unsqueeze(1)
            return cls(anchor, diffs, torch.linalg.vector_norm(diffs, dim=2).double().square())

    def __len__(self) -> int:
        return len(self.anchor)

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> NeighbourSets:
        """The sets on `device`, copied there once: every micro-batch of a run points at them."""
        device = torch.device(device)
        if device == self.device:
            return self
        if device not in self._copies:
            self._copies[device] = NeighbourSets(*(x.to(device, non_blocking=non_blocking) for x in (self.anchor, self.diffs, self.sq_norms)))
        return self._copies[device]
