"""Running our Triton kernels on a CPU: tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported when there is no GPU, so every `@triton.jit` kernel runs in Triton's interpreter
(slow: keep shapes small). `interpret()` mends one incompatibility of that interpreter.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def interpret() -> None:
    """Triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a loop bound with
    int(array), which numpy ≥ 2.4 refuses; take the element instead."""
    patch = interpreter._patch_lang_tensor
    if DEVICE.type == "cuda" or getattr(patch, "scalars_as_int", False):
        return

    def patched(tensor: object, scope: interpreter._LangPatchScope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.scalars_as_int = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


interpret()
