"""The DuckDB results store, by job: :mod:`~cptscale.store.schema` (tables), :mod:`~cptscale.store.readers`
(result files into rows), :mod:`~cptscale.store.ingest` (atomic, idempotent ingest and publishing),
:mod:`~cptscale.store.queries` (points table, status, export) and :mod:`~cptscale.store.synthetic`
(a generated study for tests and benchmarks)."""
