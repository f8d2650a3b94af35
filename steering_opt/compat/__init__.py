"""Compatibility surfaces: other steering libraries' APIs as thin adapters over steering_opt's core.

Each module matches one library's names, parameters and return shapes, and documents where (and why)
it differs. Nothing here steers, registers a hook or reads an activation itself: that is
:mod:`steering_opt.hooks` (``steer``, ``attach``, ``capture``, ``TokenSelection``),
:class:`steering_opt.vector.SteeringVector` and :mod:`steering_opt.contrastive`.

* :mod:`steering_opt.compat.llm_steering_opt` — the reference library (llm-steering-opt) and its tutorial:
  ``make_steering_hook_hf``, ``make_abl_mat``, ``hf_hooks_contextmanager`` (and the optimiser entry points).
* :mod:`steering_opt.compat.rotalabs_steer` — rotalabs-steer: ``ActivationHook``, ``ActivationInjector``,
  ``MultiVectorInjector``, ``generate_with_steering``.
* :mod:`steering_opt.compat.steering_vectors` — steering-vectors: ``train_steering_vector`` (plus the
  aggregators, operators and ``SteeringVector`` under their names there).

The adapters are imported on demand (``from steering_opt.compat.rotalabs_steer import ActivationInjector``);
importing this package imports none of them.
"""
