"""Models, loops and settings no earlier pass had tried (unseen14).

Oracles: the same run with the loss multiplied by a power of two (every product, quotient and
comparison scales exactly, so a scale-free optimizer takes bitwise the same steps), and the
module's own buffers before and after a closure call.
"""

from __future__ import annotations

import pytest
import torch

from hessfree import HessianFree


@pytest.mark.parametrize("value", [True, False])
def test_maximize_is_refused_with_the_negated_loss_as_the_fix(value):
    # main: "Did you mean `max_iter`?", a different setting
    x = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match=r"`maximize`.*always minimizes.*return its negative"):
        HessianFree([x], maximize=value)
