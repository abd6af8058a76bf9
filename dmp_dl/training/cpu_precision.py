"""The autoencoder's training precision on a CPU: bf16-mixed where the cores multiply bf16 natively.

On CPUs with bf16 dot-product units (``avx512_bf16``, ``amx_bf16``), the autoencoder's products in
bf16 (float32 accumulation; the softmax and the optimiser stay float32) make a step about a fifth
shorter on large catalogues; elsewhere bf16 is emulated and slower. Small logs keep float32: the
step is short there and their numbers stay those of every earlier run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FLOAT32 = ("32-true", "32", 32)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU advertises bf16 dot-product units (Linux ``/proc/cpuinfo`` flags; False
    where the file cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_FLAGS)


def autoencoder_precision(trainer_precision: Any, device_type: str, pairs: int, above_pairs: int | None,
                          has_bf16: bool) -> tuple[Any, str | None]:
    """(the precision the autoencoder's Trainer gets, why it differs from ``trainer_precision`` or
    None): ``bf16-mixed`` on a CPU with bf16 units (``has_bf16``) when the training rows hold more
    than ``above_pairs`` user-item pairs (``model.vae.cpu_bf16_above_pairs``; None: never) and the
    trainer asks for plain float32; else ``trainer_precision`` as configured."""
    if (device_type != "cpu" or above_pairs is None or pairs <= int(above_pairs) or not has_bf16
            or trainer_precision not in FLOAT32):
        return trainer_precision, None
    return "bf16-mixed", (f"autoencoder: bf16-mixed on this CPU's bf16 units ({pairs:,} training pairs > "
                          f"model.vae.cpu_bf16_above_pairs={int(above_pairs):,}; float32 softmax and optimiser)")
