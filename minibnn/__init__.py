"""minibnn: Binarized Neural Networks (Courbariaux et al., arXiv:1602.02830) from scratch on NumPy.

    import minibnn as bnn
    model = bnn.models.mnist_mlp(hidden=1024, layers=3)
    opt = bnn.optim.Adam(model.parameters(), lr=0.003)
    loss = bnn.losses.squared_hinge(model(bnn.Tensor(x)), labels)
    opt.zero_grad(); loss.backward(); opt.step()
"""

from . import (backend, binary, data, deploy, functional, io, losses, models, nn, optim,
               registry, runs, train)
from .binary import binary_matmul
from .rng import seed
from .summary import summary
from .tensor import Function, Tensor, no_grad

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "seed", "binary_matmul", "summary", "backend",
           "binary", "data", "deploy", "functional", "io", "losses", "models", "nn", "optim",
           "registry", "runs", "train"]
