"""The harness's posteriordb posteriors: they live in ``chainmesh.bench.posteriors``
(with their data, shipped in the package) so that ``chainmesh bench --suite
posteriordb`` can reach them from an installed package."""

from chainmesh.bench.posteriors import DATA_DIR, POSTERIORS, Posterior, stan_draws

__all__ = ["DATA_DIR", "POSTERIORS", "Posterior", "stan_draws"]
