"""The protocol on a world where the truth is known: ten Gaussian classes in feature space, the
"evaluator" logits are the exact class posteriors. A perfect generator (fresh draws) scores
within two standard errors of every floor with coverage near its ceiling; a generator collapsed
to half of the classes, or to one class of images it never saw, scores clearly worse on the
diversity side while its fidelity stays high."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aigc.config import EvaluateConfig
from aigc.metrics import Embedding, calc_metrics, reference
from aigc.metrics.evaluator import EvaluatorNet

K, DIM, N_TEST = 10, 8, 200
CENTRES = torch.randn(K, DIM, generator=torch.Generator().manual_seed(123)) * 3.0


class World(torch.nn.Module):
    """Stands in for the evaluator: only its config is read (class count) by the metrics."""

    def __init__(self):
        super().__init__()
        self.cfg = EvaluatorNet(1, 1, 1, classes=tuple(range(K)), features=DIM)


def draw(n: int, seed: int, classes: list[int] | None = None) -> tuple[Embedding, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor(classes if classes is not None else list(range(K)))
    y = pool[torch.randint(len(pool), (n,), generator=g)]
    x = CENTRES[y] + torch.randn(n, DIM, generator=g)
    logits = -0.5 * torch.cdist(x, CENTRES) ** 2  # log posterior up to a constant: equal priors, unit variance
    return Embedding(x, logits), y.numpy()


@pytest.fixture(scope="module")
def world() -> dict[str, dict[str, float]]:
    train, train_y = draw(2000, 1)
    test, _ = draw(N_TEST, 2)
    ref = reference(World(), train, test, train_y, num_samples=10 * N_TEST, seed=0)
    cfg = EvaluateConfig(num_samples=10 * N_TEST, kid_subsets=20)
    sets = {"perfect": draw(10 * N_TEST, 3)[0], "half": draw(10 * N_TEST, 4, classes=[0, 1, 2, 3, 4])[0],
            "one_unseen": draw(10 * N_TEST, 5, classes=[3])[0]}
    return {name: calc_metrics(e, ref, cfg) for name, e in sets.items()}


SCORES = ("fid", "kid", "is", "precision", "recall", "density", "coverage", "modes", "class_kl")


@pytest.mark.parametrize("name", SCORES)
def test_a_perfect_generator_scores_within_two_standard_errors_of_the_floor(world, name: str):
    s = world["perfect"]
    spread = math.hypot(s.get(f"{name}_se", 0.0), s.get(f"{name}_floor_se", 0.0))
    assert abs(s[name] - s[f"{name}_floor"]) <= 2 * spread + 1e-9, (s[name], s[f"{name}_floor"], spread)


def test_a_perfect_generator_reaches_the_ceilings_of_coverage_and_density(world):
    s = world["perfect"]
    assert s["coverage"] >= 0.9 and abs(s["coverage"] - s["coverage_ceiling"]) < 0.03
    assert s["recall"] >= 0.9 and s["precision"] >= 0.9  # equal sizes: neither saturates at ~0.4
    assert abs(s["density"] - 1.0) < 0.1 and s["modes"] == K


def test_partial_collapse_to_half_the_classes_drops_diversity_not_fidelity(world):
    s, p = world["half"], world["perfect"]
    assert s["modes"] == 5 and s["class_kl"] == pytest.approx(math.log(2), abs=0.05)
    for name in ("coverage", "recall"):  # about half the real balls are reachable
        assert s[name] < 0.65 < p[name] - 0.25, name
    assert s["precision"] > 0.9  # every image is still a good image
    assert s["fid"] > p["fid_floor"] + 20 * p["fid_floor_se"]
    assert s["is"] < s["is_floor"] - 2  # about 5 instead of about 10


def test_collapse_to_one_class_of_unseen_images(world):
    """Not training copies: fresh draws of one class. Precision stays high, so a test passes only
    if recall, coverage and modes see the collapse."""
    s = world["one_unseen"]
    assert s["modes"] == 1 and s["recall"] < 0.2 and s["coverage"] < 0.2 and s["precision"] > 0.9
    assert s["is"] < 1.5 < s["is_floor"]
    assert s["fid"] > world["half"]["fid"]
