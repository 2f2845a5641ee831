"""The study config: :mod:`~cptscale.config.schema` (the typed models, the single source of truth),
:mod:`~cptscale.config.problems` (how a problem is reported) and :mod:`~cptscale.config.checks`
(cross-field checks within the config). Loading and validating a config file, including the checks that
plan the study, is :mod:`cptscale.validation`."""
