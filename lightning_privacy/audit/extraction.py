"""Model extraction: how well can a client copy a model from its prediction API?

The attacker is a client of the encrypted server: it owns its keys, so it decrypts full logits.
It sends ``query_budget`` inputs, fits a surrogate on (input, logits), and we measure the
surrogate's *fidelity* (argmax agreement with the target on held-out data) and accuracy.

Surrogates: ``linear`` and ``quadratic`` solve equations (least squares on the inputs, or on the
inputs and their pairwise products, by truncated SVD: exact for a linear layer, or a network with
one square activation, once the queries span the unknowns); ``mlp`` distils the logits into a small
MLP for anything deeper. A CKKS model is a polynomial of its inputs, so equation solving applies to
every served model whose degree is known.

Defences a server can apply without seeing plaintexts, here as wrappers of an in-process target
(the served versions are settings of the ``ckks`` flavor): :class:`OutputPerturbation` adds
Gaussian noise to the logits, :class:`QueryBudget` refuses a client past its budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from torch import nn

from lightning_privacy.errors import AuditConfigError, QueryBudgetExhaustedError

#: Surrogate models by name.
SURROGATES = ("linear", "quadratic", "mlp")

Target = Callable[[np.ndarray], np.ndarray]


class OutputPerturbation:
    """A target whose logits carry N(0, scale²) noise, fresh for every query.

    Args:
        target: inputs ``(n, d)`` -> logits ``(n, k)``.
        scale: noise standard deviation, in logit units.
        seed: seed of the noise.

    Example::

        defended = OutputPerturbation(model_logits, scale=0.5)
    """

    def __init__(self, target: Target, scale: float, seed: int = 0) -> None:
        if not scale >= 0:
            raise AuditConfigError(f"The perturbation scale must be >= 0, got {scale}.")
        self.target = target
        self.scale = float(scale)
        self._rng = np.random.default_rng(seed)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.target(x), dtype=np.float64)
        return logits + self._rng.normal(0.0, self.scale, logits.shape)

    @staticmethod
    def calibrate(logits: np.ndarray, max_flips: float = 0.01, seed: int = 0) -> float:
        """The largest noise scale that changes the predicted class of at most ``max_flips`` of
        ``logits`` (the defender's own data): what utility the defence may cost, fixed up front.

        Raises:
            AuditConfigError: ``max_flips`` outside (0, 1) or empty ``logits``.
        """
        logits = np.asarray(logits, dtype=np.float64)
        if not 0 < max_flips < 1 or logits.size == 0:
            raise AuditConfigError(f"Need max_flips in (0, 1) and some logits, got {max_flips} and {logits.shape}.")
        noise = np.random.default_rng(seed).normal(size=(8, *logits.shape))  # common random numbers
        labels = logits.argmax(axis=1)

        def flips(scale: float) -> float:
            return float(((logits + scale * noise).argmax(axis=2) != labels).mean())

        lo, hi = 0.0, float(np.ptp(logits)) or 1.0
        while flips(hi) <= max_flips:
            lo, hi = hi, 2 * hi
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if flips(mid) <= max_flips else (lo, mid)
        return lo


class QueryBudget:
    """A target that answers at most ``max_queries`` inputs, then raises.

    Args:
        target: inputs -> logits.
        max_queries: inputs answered in total; a request that would exceed it is refused whole.

    Raises:
        QueryBudgetExhaustedError: from ``__call__``, once the budget would be exceeded.

    Example::

        defended = QueryBudget(model_logits, max_queries=1000)
    """

    def __init__(self, target: Target, max_queries: int) -> None:
        if max_queries < 0:
            raise AuditConfigError(f"max_queries must be >= 0, got {max_queries}.")
        self.target = target
        self.max_queries = int(max_queries)
        self.used = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.used + len(x) > self.max_queries:
            raise QueryBudgetExhaustedError(
                f"Query budget exhausted: {self.used} of {self.max_queries} inputs answered, this request asks for "
                f"{len(x)} more."
            )
        self.used += len(x)
        return self.target(x)


@dataclass(frozen=True)
class ExtractionPoint:
    """One budget of an extraction attack.

    Attributes:
        budget: queries the attacker was allowed to spend.
        answered: queries the target answered (fewer under a query-budget defence).
        fidelity: argmax agreement of surrogate and target on the held-out inputs.
        accuracy: the surrogate's accuracy on held-out labels (``None`` without labels).
    """

    budget: int
    answered: int
    fidelity: float
    accuracy: float | None


@dataclass(frozen=True)
class ExtractionReport:
    """Fidelity and accuracy of the surrogate at each query budget."""

    surrogate: str
    points: tuple[ExtractionPoint, ...]
    target_accuracy: float | None

    def as_metrics(self, prefix: str = "extraction.") -> dict[str, float]:
        """``extraction.fidelity_at_100``, ``extraction.accuracy_at_100``, ... for MLflow."""
        out: dict[str, float] = {}
        for p in self.points:
            out[f"{prefix}fidelity_at_{p.budget}"] = p.fidelity
            out[f"{prefix}answered_at_{p.budget}"] = float(p.answered)
            if p.accuracy is not None:
                out[f"{prefix}accuracy_at_{p.budget}"] = p.accuracy
        return out


def synthetic_queries(pool: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` query inputs: the attacker's ``pool`` (shuffled), then random mixtures of two
    pool inputs (λ uniform) once the pool runs out."""
    pool = np.asarray(pool, dtype=np.float64)
    if len(pool) == 0:
        raise AuditConfigError("Extraction needs a non-empty pool of attacker inputs.")
    rng = np.random.default_rng(seed)
    first = pool[rng.permutation(len(pool))[:count]]
    extra = count - len(first)
    if extra <= 0:
        return first
    a, b = pool[rng.integers(0, len(pool), extra)], pool[rng.integers(0, len(pool), extra)]
    lam = rng.random((extra,) + (1,) * (pool.ndim - 1))
    return np.concatenate([first, lam * a + (1 - lam) * b])


def _ask(target: Target, queries: np.ndarray, chunk: int) -> np.ndarray:
    """Target logits for as many queries as it answers, in chunks, until it refuses."""
    answers = []
    for start in range(0, len(queries), chunk):
        try:
            answers.append(np.asarray(target(queries[start : start + chunk]), dtype=np.float64))
        except QueryBudgetExhaustedError:
            break
    k = answers[0].shape[1] if answers else 0
    return np.concatenate(answers) if answers else np.zeros((0, k))


def _quadratic_features(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1)
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([np.ones((len(x), 1)), x, x[:, i] * x[:, j]], axis=1)


def _linear_features(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1)
    return np.concatenate([np.ones((len(x), 1)), x], axis=1)


#: Truncation levels tried for equation solving: singular values of the design matrix below this
#: fraction of the largest are dropped (truncated SVD). Plain least squares amplifies noise in the
#: answers near the interpolation threshold: on a digits x² MLP with 1000 queries and logit noise of
#: s.d. 1, fidelity was 0.14 with every singular value kept and 0.99 with a 1e-2 cut; on noiseless
#: answers a cut that high can drop real directions (0.978 instead of 1.0 with 32 inputs).
SINGULAR_CUTOFFS = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 3e-2)


def _truncated_solvers(f: np.ndarray, y: np.ndarray) -> Callable[[float], np.ndarray]:
    """Coefficients for any cutoff from one eigendecomposition of the Gram matrix: the unknowns
    (2145 for 64 inputs) are far fewer than the queries, and a 2145² eigendecomposition is much
    cheaper than an SVD of 10,000 rows."""
    eigenvalues, vectors = linalg.eigh(f.T @ f)
    projected = vectors.T @ (f.T @ y)

    def solve(cutoff: float) -> np.ndarray:
        keep = eigenvalues > cutoff**2 * eigenvalues.max()
        return vectors[:, keep] @ (projected[keep] / eigenvalues[keep, None])

    return solve


def _fit_least_squares(features: Callable[[np.ndarray], np.ndarray], x: np.ndarray, logits: np.ndarray, seed: int = 0):
    """Equation solving with the truncation an attacker would pick: the one with the least error
    on a tenth of its own queries held out (the target's answers to them, nothing else)."""
    f = features(x)
    cutoff = SINGULAR_CUTOFFS[0]
    if len(f) >= 20:
        order = np.random.default_rng(seed).permutation(len(f))
        held, fit = order[: len(f) // 10], order[len(f) // 10 :]
        solve = _truncated_solvers(f[fit], logits[fit])
        errors = [float(np.mean((f[held] @ solve(c) - logits[held]) ** 2)) for c in SINGULAR_CUTOFFS]
        cutoff = SINGULAR_CUTOFFS[int(np.argmin(errors))]
    coef = _truncated_solvers(f, logits)(cutoff)
    return lambda z: features(z) @ coef


def _fit_mlp(x: np.ndarray, logits: np.ndarray, seed: int, epochs: int = 300, hidden: int = 64):
    torch.manual_seed(seed)
    xt = torch.as_tensor(x.reshape(len(x), -1), dtype=torch.float32)
    yt = torch.as_tensor(logits, dtype=torch.float32)
    net = nn.Sequential(nn.Linear(xt.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, yt.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    batch = min(len(xt), 512)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(batch):
            opt.zero_grad()
            nn.functional.mse_loss(net(xt[idx]), yt[idx]).backward()
            opt.step()
    net.eval()

    def predict(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.as_tensor(z.reshape(len(z), -1), dtype=torch.float32)).numpy()

    return predict


def extraction(
    target: Target,
    query_budget: int | Sequence[int],
    *,
    pool: np.ndarray,
    holdout: np.ndarray,
    holdout_labels: np.ndarray | None = None,
    reference: Target | None = None,
    surrogate: str = "mlp",
    chunk: int = 100,
    mlp_epochs: int | None = None,
    seed: int = 0,
) -> ExtractionReport:
    """Extract ``target`` with each budget in ``query_budget`` and measure the copies.

    The queries of a smaller budget are a prefix of a larger one's, so the target is asked
    ``max(query_budget)`` inputs once, in chunks of ``chunk``; a target that refuses (a query
    budget) leaves the attacker with the answers it got.

    Args:
        target: the prediction API: inputs ``(n, *input_shape)`` -> logits ``(n, k)``.
        query_budget: one or several numbers of queries.
        pool: inputs the attacker owns (unlabelled); mixtures of them fill larger budgets.
        holdout: inputs for fidelity, disjoint from ``pool``.
        holdout_labels: true labels of ``holdout``, for accuracy.
        reference: what fidelity compares against (the undefended model); default ``target``
            (give it for a defended target: fidelity to a noisy target is no measure of the copy).
        surrogate: ``"linear"``, ``"quadratic"`` or ``"mlp"`` (see the module docstring).
        chunk: inputs per request.
        mlp_epochs: training epochs of the ``mlp`` surrogate (default: about 2e5 examples seen, at least 40).
        seed: seed of queries and surrogate training.

    Raises:
        AuditConfigError: an unknown surrogate, a budget < 1, or an empty pool.

    Example::

        report = extraction(lambda x: model(torch.tensor(x)).numpy(), [100, 1000, 10000],
                            pool=x_attacker, holdout=x_test, holdout_labels=y_test)
        [p.fidelity for p in report.points]

        # against a model served with `mlflow models serve` (and its defences), as its client:
        with ScoringServer(uri) as server, EncryptedClient(uri, url=server.url, layout="batch") as client:
            report = extraction(budgeted(client.predict_logits), [100, 1000, 10000], pool=x_attacker,
                                holdout=x_test, reference=model_logits, chunk=1000)
    """
    if surrogate not in SURROGATES:
        raise AuditConfigError(f"Unknown surrogate {surrogate!r}; choose from {SURROGATES}.")
    budgets = sorted(
        {int(query_budget)} if isinstance(query_budget, (int, np.integer)) else {int(b) for b in query_budget}
    )
    if not budgets or budgets[0] < 1:
        raise AuditConfigError(f"Query budgets must be >= 1, got {query_budget}.")
    holdout = np.asarray(holdout, dtype=np.float64)
    queries = synthetic_queries(pool, budgets[-1], seed)
    answers = _ask(target, queries, chunk)
    truth = np.asarray((reference or target)(holdout)).argmax(axis=1)
    target_accuracy = None if holdout_labels is None else float((truth == np.asarray(holdout_labels)).mean())
    points = []
    for b in budgets:
        n = min(b, len(answers))
        if n == 0:
            points.append(ExtractionPoint(b, 0, 0.0, None if holdout_labels is None else 0.0))
            continue
        x, y = queries[:n], answers[:n]
        if surrogate == "linear":
            predict = _fit_least_squares(_linear_features, x, y, seed)
        elif surrogate == "quadratic":
            predict = _fit_least_squares(_quadratic_features, x, y, seed)
        else:
            epochs = mlp_epochs or max(40, min(1000, 200_000 // n))
            predict = _fit_mlp(x, y, seed, epochs=epochs)
        guess = predict(holdout).argmax(axis=1)
        accuracy = None if holdout_labels is None else float((guess == np.asarray(holdout_labels)).mean())
        points.append(ExtractionPoint(b, n, float((guess == truth).mean()), accuracy))
    return ExtractionReport(surrogate, tuple(points), target_accuracy)
