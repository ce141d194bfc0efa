"""Full fine-tuning: no adapter; every weight of the model trains and the whole model is saved."""

from __future__ import annotations

from .spec import MethodSpec

SPEC = MethodSpec(name="full", help="train every weight", config_cls=None, injector=None,
                  merges=False, shardable=True, learning_rate=5e-5)
