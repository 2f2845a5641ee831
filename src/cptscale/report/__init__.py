"""The HTML report, by job: :mod:`~cptscale.report.queries` (what it reads from the store),
:mod:`~cptscale.report.figures` (one Altair builder per figure) and :mod:`~cptscale.report.page` (the
offline page, images and report.json)."""
