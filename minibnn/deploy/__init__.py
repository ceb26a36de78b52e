"""Deploy: freeze a trained BNN (MLP or ConvNet) into packed bits and integer thresholds.

Once trained, a BNN needs only bits, XNOR and popcount at run time (Courbariaux et al.,
"Binarized Neural Networks", arXiv:1602.02830, Section 3). ``freeze(model)`` keeps just
that, in the order the paper's Section 3 reads:

* **Packed weights.** Each layer's ``sign(W)`` (sign(0) = +1) packed 64 to a uint64 word
  along the input axis, bit 1 = +1 (``kernels.reference.pack_rows``). A product of +-1
  vectors of length k is ``k - 2 popcount(a XOR b)``: an exact integer ``z``.
* **BN + sign as an integer threshold.** In eval mode a batch norm is a per-unit affine
  ``y = a s + c`` (``BatchNorm.eval_affine``: ``a = gamma / sqrt(var + eps)``;
  ``ShiftBatchNorm``: ``a = AP2(gamma) AP2(1 / sqrt(var + eps))``; both
  ``c = beta - a mean``), so for an integer pre-activation ``z``, ``sign(BN(z)) = +1`` iff
  ``z >= ceil(-c / a)`` when ``a > 0`` and iff ``z <= floor(-c / a)`` when ``a < 0``. A
  unit with ``a < 0`` has its weight row negated at freeze time (``-z`` is the dot product
  with ``-w``), so every hidden unit runs as one test: ``bit = z >= tau``.
* **The first layer on 8-bit input** (the paper's Section 1.6). The model sees
  ``x_f = (2 x - 255) / 256`` for uint8 pixels ``x`` (``data.to_pm1``). With the bit
  planes ``x^n`` of ``x`` and their signs ``y^n = 2 x^n - 1``, ``2 x - 255 = sum_n 2^n y^n``,
  hence

      x_f . w = (1 / 256) sum_{n=0..7} 2^n (y^n . w)        (y^n, w in {-1, +1})

  i.e. the paper's ``sum_n 2^(n-1) (x^n . w)`` written for +-1 planes: eight XNOR-popcount
  products of the packed planes, shifted and added into the exact integer
  ``z = 256 (x_f . w)``, which is thresholded like any other layer.
* **Packed activations.** A hidden layer's bits are packed straight into the next layer's
  operand; nothing is unpacked in between.
* **The output layer.** Its batch norm folds into ``scores = scale * z + offset``
  (float64), the only floating-point arithmetic left; ``predict`` is its argmax (ties go
  to the first index, as ``numpy.argmax``).
* **Agreement with the float32 model.** Thresholds are computed in float64. Every
  pre-activation is exact in the float32 model too: a hidden layer's is a sum of +-1
  products, and the first layer's is z / 256 with z an integer below 2^18, because its
  inputs are multiples of 1/256. So each threshold is also checked against the layer's own
  float32 batch norm on the integers next to it, and follows the model where float32
  rounding of the batch norm moves its decision by one integer
  (``FrozenBNN.info['float32_adjusted']`` counts those units per layer): every layer
  agrees with the float32 model bit for bit.

**ConvNets** (``BinaryConv2d -> [MaxPool2d] -> [BN] -> Sign`` blocks, then Flatten and the
dense layers above) freeze the same way, per channel (``freezing``'s docstring has the
math):

* A binary convolution's exact integer ``z`` is the XNOR-popcount product of the patches,
  padded taps set to +1, minus the padding correction ``corr[o, ho, wo]`` = the sum of the
  filter's weights over the taps in the padding (``binary.padding_correction``): the
  model's zero-padded convolution exactly. The first one runs on the pixels' bit planes
  with the pixels padded by 255, minus ``255 corr``: ``z = 256 x`` the float convolution.
* conv -> pool -> BN -> sign is ``sign(BN(max z))``: for a BN slope > 0 the OR over the
  window of ``z >= tau``, for a slope < 0 (filter negated) the AND of ``-z >= -t``. So the
  bits are thresholded first and max-pooled as packed words (OR, or AND per channel).
* Activations stay packed between layers, NHWC with the channels of a pixel in uint64
  words; a patch is a gather of those words (``runtime``'s docstring has the layout). The
  first dense layer's weight columns are permuted at freeze time from the model's
  (C, H, W) flatten order to the runtime's (H, W, C).

``frozen.save(path)`` / ``load(path)`` use one ``.npz`` with a format version (1 for an
MLP, 2 with convolutions; ``fileformat``).

One job per module: ``freezing`` (the freeze math above), ``runtime`` (``FrozenConv``,
``FrozenLayer``, ``FrozenBNN``: running a frozen net on a backend), ``fileformat`` (save,
load, validation).
"""

from .fileformat import FORMAT, FORMAT_VERSION, FrozenFormatError, is_frozen_file, load
from .freezing import INPUT_SHAPES, freeze
from .runtime import FrozenBNN, FrozenConv, FrozenLayer, first_layer

__all__ = ["FORMAT", "FORMAT_VERSION", "FrozenFormatError", "FrozenConv", "FrozenLayer",
           "FrozenBNN", "INPUT_SHAPES", "freeze", "load", "is_frozen_file"]
