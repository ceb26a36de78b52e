"""minibnn: Binarized Neural Networks (Courbariaux et al., arXiv:1602.02830) from scratch on NumPy.

    import minibnn as bnn
    model = bnn.models.mnist_mlp(hidden=1024, layers=3)
    opt = bnn.optim.Adam(model.parameters(), lr=0.003)
    loss = bnn.losses.squared_hinge(model(bnn.Tensor(x)), labels)
    opt.zero_grad(); loss.backward(); opt.step()
"""

import importlib.util as _ilu
import os as _os
import sys as _sys
from pathlib import Path as _Path

# OpenBLAS's worker threads spin after each multi-threaded product (about 2^28 cycles,
# a tenth of a second, unless OPENBLAS_THREAD_TIMEOUT says otherwise) before they sleep. On
# a 2-core machine they then hold the core that numba's parallel kernels need next: the
# numba ConvNet training step spent about 90 ms more CPU per step with them spinning
# (~210 ms against ~115 ms, 2-core Zen 4, other jobs running). Unless the user set it,
# the shortest wait (2^4) is asked for. OpenBLAS reads it once, when NumPy loads it: this
# takes effect when minibnn is imported before NumPy (``python -m minibnn`` and the
# benchmarks do); a program that imports NumPy first sets the variable itself.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _kernels_from_source_checkout():
    """Make ``minibnn.kernels`` importable when minibnn runs from a source checkout.

    The repository keeps the kernels in a top-level ``kernels/`` folder; an install maps
    that folder to ``minibnn.kernels`` (``package_dir`` in setup.cfg), so that no top-level
    module named ``kernels`` is installed (one on the package index would collide). Run
    from a checkout without installing (``PYTHONPATH=.``), or from an editable install of
    another checkout, the sibling folder of this package is loaded under the same name.
    """
    here = _Path(__file__).resolve().parent
    src = here.parent / "kernels"
    if (here / "kernels").is_dir() or "minibnn.kernels" in _sys.modules:
        return  # installed layout, or already loaded
    if not ((here.parent / "setup.cfg").is_file() and (src / "reference.py").is_file()):
        return
    spec = _ilu.spec_from_file_location("minibnn.kernels", src / "__init__.py",
                                        submodule_search_locations=[str(src)])
    module = _ilu.module_from_spec(spec)
    _sys.modules["minibnn.kernels"] = module
    spec.loader.exec_module(module)


_kernels_from_source_checkout()

from . import kernels  # noqa: E402  (the XNOR kernels, a leaf that never imports minibnn)
from . import (backend, binary, data, deploy, functional, io, losses, models, nn, optim,
               registry, runs, train)
from .binary import binary_matmul  # noqa: E402
from .rng import seed  # noqa: E402
from .summary import summary  # noqa: E402
from .tensor import Function, Tensor, no_grad

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "seed", "binary_matmul", "summary", "backend",
           "binary", "data", "deploy", "functional", "io", "kernels", "losses", "models", "nn", "optim",
           "registry", "runs", "train"]
