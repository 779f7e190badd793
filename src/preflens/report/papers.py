"""The papers the report cites, spelled once so the diagnosis, the captions and the comparison page agree."""

from __future__ import annotations

__all__ = ["YUAN", "RAZIN", "MA"]

# "A Common Pitfall of Margin-based Language Model Alignment: Gradient Entanglement" (ICLR 2025)
YUAN = "Yuan et al. 2024, arXiv 2410.13828"
# "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization"
RAZIN = "Razin et al. 2024, arXiv 2410.08847"
# "Gradient Imbalance in Direct Preference Optimization"
MA = "Ma et al. 2025, arXiv 2502.20847"
