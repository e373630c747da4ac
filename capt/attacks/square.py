"""The Square attack, a black-box, query-based random search, from Andriushchenko, Croce, Flammarion &
Hein, "Square Attack: a query-efficient black-box adversarial attack via random search", ECCV 2020,
arXiv:1912.00049; torchattacks' implementation (``torchattacks.Square``) under this package's
contract (``_torchattacks.py``).

Threat model: L∞, radius ``eps`` in pixel units ([0, 1] images). It uses only the model's logits,
never a gradient: start from vertical stripes of ±eps, then at each query change a random square of
the perturbation to a random ±eps vertex and keep it if the margin loss
``z_y − max_{k≠y} z_k`` decreases; the square's side shrinks on AutoAttack's schedule (``p_init =
0.8``, rescaled to the query budget). At most ``queries`` model queries per image (default 5000,
AutoAttack's standard), one restart. Because it needs no gradient, it is the check for gradient
masking: where Square fools images the gradient attacks could not, their gradients mislead.
"""
from __future__ import annotations

from torch import nn

from ._torchattacks import TorchattacksAttack, seeded, torchattacks

STANDARD_QUERIES = 5000


class Square(TorchattacksAttack):
    name = "square"

    def __init__(self, model: nn.Module, eps: float, queries: int = STANDARD_QUERIES, seed: int | None = 0):
        super().__init__(model, eps, seed)
        if queries < 1:
            raise ValueError(f"queries must be >= 1, got {queries}")
        self.queries = int(queries)

    def build(self, model):
        return torchattacks().Square(model, norm="Linf", eps=self.eps, n_queries=self.queries, n_restarts=1,
                                     p_init=0.8, loss="margin", resc_schedule=True, seed=seeded(self.seed))
