"""The same BNN in PyTorch, built layer for layer from a minibnn model: the benchmark's anchor.

Used by ``bench_train.py`` only when PyTorch is importable; minibnn never depends on it.
``torch_twin(model)`` walks a minibnn ``Sequential`` and builds the PyTorch network with
the same layers, sizes, binarization and recipe pieces:

* ``BinaryLinear`` / ``BinaryConv2d``: latent float weights, ``sign`` (sign(0) = +1) in the
  forward, the gradient handed to the latent weight unchanged (straight-through), the
  product in float (PyTorch has no XNOR kernel); the latent weights are clipped to
  [-1, 1] after each step and each layer's Adam step is scaled by its Glorot ``lr_scale``
  (one parameter group per layer), as in minibnn and the authors' code;
* ``BatchNorm``/``BatchNorm2d`` (and the shift variants, timed as the standard one):
  ``nn.BatchNorm1d/2d`` with the same eps and momentum;
* ``Sign``: sign forward, ``g * 1{|x| <= 1}`` backward; ``Dropout``, ``MaxPool2d``,
  ``Flatten`` as in PyTorch;
* loss: the squared hinge, mean over batch x classes of max(0, 1 - t*y)^2.

``TorchTrainer(model, lr, device)`` runs steps eagerly, or, on a GPU with ``graph=True``,
as one captured CUDA graph (PyTorch's whole-network capture: warm-up on a side stream,
``torch.cuda.graph``, then ``replay`` after copying the batch into static tensors; Adam
with ``capturable=True``).
"""

import torch
from torch import nn as tnn

from minibnn import nn as bnn_nn


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).to(g.dtype)


class _BinarizeWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


class Sign(tnn.Module):
    def forward(self, x):
        return _SignSTE.apply(x)


class BinaryLinear(tnn.Linear):
    def forward(self, x):
        return tnn.functional.linear(x, _BinarizeWeights.apply(self.weight))


class BinaryConv2d(tnn.Conv2d):
    def forward(self, x):
        return tnn.functional.conv2d(x, _BinarizeWeights.apply(self.weight), None,
                                     self.stride, self.padding)


def torch_twin(model):
    """(torch Sequential, [lr_scale of each binary layer's weight]) mirroring ``model``."""
    layers, scales = [], []
    for m in model.layers:
        if isinstance(m, bnn_nn.BinaryLinear):
            out_f, in_f = m.weight.shape
            t = BinaryLinear(in_f, out_f, bias=False)
        elif isinstance(m, bnn_nn.BinaryConv2d):
            t = BinaryConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                             bias=False)
        elif isinstance(m, bnn_nn._BatchNormBase):
            cls = tnn.BatchNorm2d if isinstance(m, bnn_nn._Require4D) else tnn.BatchNorm1d
            t = cls(m.num_features, eps=m.eps, momentum=m.momentum)
        elif isinstance(m, bnn_nn.Sign):
            t = Sign()
        elif isinstance(m, bnn_nn.Dropout):
            t = tnn.Dropout(m.p)
        elif isinstance(m, bnn_nn.MaxPool2d):
            t = tnn.MaxPool2d(m.kernel_size, m.stride)
        elif isinstance(m, bnn_nn.Flatten):
            t = tnn.Flatten()
        else:
            raise TypeError(f"torch_twin: no PyTorch twin for {type(m).__name__}")
        if isinstance(t, (BinaryLinear, BinaryConv2d)):
            with torch.no_grad():
                t.weight.copy_(torch.as_tensor(_numpy(m.weight.data)))
            scales.append(m.weight.lr_scale)
        layers.append(t)
    return tnn.Sequential(*layers), scales


def _numpy(a):
    return a.get() if hasattr(a, "get") else a


def squared_hinge(out, labels):
    t = -torch.ones_like(out)
    t.scatter_(1, labels.view(-1, 1), 1.0)
    return torch.clamp(1.0 - out * t, min=0).pow(2).mean()


class TorchTrainer:
    """Adam training steps of ``torch_twin(model)`` on ``device``, eager or as a CUDA graph."""

    def __init__(self, model, lr=1e-3, device="cpu", graph=False):
        self.net, scales = torch_twin(model)
        self.net.to(device).train()
        self.device, self.graph = torch.device(device), None
        binary = [m for m in self.net if isinstance(m, (BinaryLinear, BinaryConv2d))]
        self.latent = [m.weight for m in binary]
        others = [p for p in self.net.parameters() if all(p is not w for w in self.latent)]
        groups = [{"params": [w], "lr": lr * s} for w, s in zip(self.latent, scales)]
        groups.append({"params": others, "lr": lr})
        self.opt = torch.optim.Adam(groups, capturable=bool(graph))
        self.use_graph = bool(graph)

    def _step(self, x, y):
        self.opt.zero_grad(set_to_none=False)
        loss = squared_hinge(self.net(x), y)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for w in self.latent:
                w.clamp_(-1.0, 1.0)
        return loss

    def _capture(self, x, y):
        self.static_x, self.static_y = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(self.static_x, self.static_y)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step(self.static_x, self.static_y)

    def step(self, x, y):
        """One training step on the batch (x, y) (torch tensors on the device)."""
        if not self.use_graph:
            return self._step(x, y)
        if self.graph is None:
            self._capture(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        self.graph.replay()
        return self.static_loss

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
