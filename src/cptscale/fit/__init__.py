"""Scaling-law fitting, by job: :mod:`~cptscale.fit.laws` (what a law is), :mod:`~cptscale.fit.points`
(fitting data), :mod:`~cptscale.fit.optimizer` (Huber objective, batched L-BFGS),
:mod:`~cptscale.fit.estimate` (fitting each law, allocation), :mod:`~cptscale.fit.uncertainty` (bootstrap,
held-out validation) and :mod:`~cptscale.fit.study` (every fit of a study, the workflow's fit step)."""
