"""preflens: preference optimization with diagnostics of why a run goes wrong.

The public contract (see DESIGN.md): `preflens.losses.get_loss`, `preflens.losses.LOSSES`,
`preflens.losses.PairLogps`, `preflens.diagnostics.gram.sequence_gram`,
`preflens.diagnostics.ches.ches_score`.
"""

__version__ = "0.1.0"
