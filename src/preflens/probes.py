"""Old path of the gradient probes; they live in `preflens.diagnostics.probe_state` (the measurement of a
fixed probe set) and `preflens.training.probes` (the trainer's callback). Kept for importers."""

from preflens.diagnostics.probe_state import PreviousProbe, ProbeHistory, ProbeRunner, probe_rows
from preflens.training.probes import ProbeCallback, StepEntanglement

__all__ = ["ProbeRunner", "ProbeHistory", "PreviousProbe", "StepEntanglement", "ProbeCallback", "probe_rows"]
