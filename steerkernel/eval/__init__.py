"""Does steering do what it says?  An evaluation harness with an independent judge.

* :mod:`~steerkernel.eval.harness` -- ``evaluate``: dose-response of steering one concept
  (judge effect, coherence cost, monitor reading, bootstrap intervals); ``steerkernel eval``.
* :mod:`~steerkernel.eval.calibrate` -- ``calibrate.calibrate``: the recommended strength per
  concept, stored in the bank's metadata by ``calibrate.apply`` (read it back with
  ``bank.recommended(name)``); ``steerkernel calibrate``.
* :mod:`~steerkernel.eval.choices` -- the behavioural A/B probe, p(harmful) under steering;
  ``steerkernel probe``.
* :mod:`~steerkernel.eval.judge` -- the independent judge (VADER); the bootstrap intervals
  are :mod:`steerkernel.stats`.
"""
from . import calibrate  # the module: calibrate.calibrate(...), calibrate.apply(...)
from .choices import probe
from .harness import evaluate

__all__ = ["evaluate", "calibrate", "probe"]
